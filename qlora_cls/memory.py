"""Memory dry-run (``ft.py --dry_run``): what a run will need, per process, without loading weights.

The architecture is built on the meta device and every figure computed from shapes: 4-bit weights, trained
parameters and gradients, optimizer state, the longest batch's activations (ZeRO shards them over the world
size). An estimate: allocator caching, kernels' workspaces and the CUDA context are not in it. What each term
counts: docs/speed-and-memory.md#memory-module.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch

from .errors import UsageError
from .methods import BottleneckAdapter, meta_trainable, plan, resolve_param_budget
from .modeling import head_modules, is_linear, meta_model, parameter_counts
from .pipeline import prepare_data, resolve_paths, tokenizer_for
from .preflight import zero_stage
from .tasks import GLUE_TASKS

log = logging.getLogger(__name__)

QUANT_BLOCK = 64  # bitsandbytes 4-bit block size
NESTED_BLOCK = 256  # double quantization: blocks of absmax constants
OPT_BLOCK = 256  # bitsandbytes 8-bit optimizer block size
OPT_MIN_8BIT = 4096  # smaller tensors keep 32-bit optimizer state (bitsandbytes min_8bit_size)
GiB = 1024 ** 3
MiB = 1024 ** 2
# The estimate is a floor: it leaves out the CUDA context, kernel workspaces and the caching allocator's
# slack, and the reference run reported ~18 GB per GPU against an estimate of 6.4-8.7 GiB (README,
# "Memory dry-run"). So gradient checkpointing goes on unless the estimate without it fits in half the device.
GPU_MEMORY_SHARE = 0.5


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1}[name]


def quantized_linear_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one 4-bit weight: packed values + its absmax constants (one per block of 64: fp32, or with double
    quantization 8-bit plus an fp32 second-level constant per 256 blocks)."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK)
    else:
        constants = 4 * blocks
    return math.ceil(numel / 2) + constants


def optimizer_state_bytes(params, optim: str) -> int:
    total = 0
    for p in params:
        n = p.numel()
        if optim == "adamw_torch" or n < OPT_MIN_8BIT:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / OPT_BLOCK)
    return total


def weight_breakdown(model, cfg, skip: list[str]) -> dict:
    """Bytes of the frozen base (4-bit or not) of a meta-device model, before LoRA is added."""
    compute = _dtype_bytes(cfg.bnb_4bit_compute_dtype)
    quantized = packed = constants = other = 0
    largest = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not is_linear(module):  # nn.Linear and GPT-2's Conv1D: both become Linear4bit
            continue
        is_skipped = any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)
        if cfg.load_in_4bit and not is_skipped:
            n = module.weight.numel()
            quantized += n
            q = quantized_linear_bytes(n, cfg.bnb_4bit_use_double_quant)
            packed += math.ceil(n / 2)
            constants += q - math.ceil(n / 2)
            largest = max(largest, n)
            seen.add(id(module.weight))
    head = {id(p) for name in head_modules(model) for p in getattr(model, name).parameters()}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # prepare_model_for_kbit_training casts the non-quantized parameters to fp32; a 16-bit base keeps
        # its head in fp32 (modeling.head_in_float32).
        other += p.numel() * (4 if cfg.load_in_4bit or id(p) in head else compute)
        if not cfg.load_in_4bit and p.dim() == 2:
            largest = max(largest, p.numel())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"quantized_params": quantized, "packed_bytes": packed, "quant_constant_bytes": constants,
            "other_param_bytes": other, "buffer_bytes": buffers,
            "weight_bytes": packed + constants + other + buffers,
            "largest_dequantized_bytes": largest * compute if cfg.load_in_4bit else 0}


def activation_bytes(config, tokens: int, seq_len: int, cfg, training: bool, method_bytes: int) -> int:
    """Estimated activation memory of one batch of ``tokens`` (= batch x padded length) tokens.

    ``method_bytes``: what the trained modules keep per token and layer (``method_activation_bytes``)."""
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (h // heads)
    cb = _dtype_bytes(cfg.bnb_4bit_compute_dtype)
    rb = 4 if cfg.load_in_4bit else cb  # residual stream: fp32 embeddings/norms after prepare_model_for_kbit_training
    # Attention probabilities (heads x seq_len per token and layer) exist only in eager attention. SDPA
    # and flash kernels (transformers' default) keep none: counting them over-estimated the measured
    # peak 2.3x at 200 tokens on the tiny model. They instead get one padding mask per batch, seq_len per
    # token, shared by every layer. transformers has no public getter for the implementation in use.
    eager = getattr(config, "_attn_implementation", "eager") == "eager"
    attn = heads * seq_len if eager else 0
    mask = seq_len * cb
    if not training:  # inference: one layer's working set at a time
        return tokens * (3 * h * rb + (2 * h + 2 * kv + 3 * inter + attn) * cb + mask)
    per_layer = 4 * h * rb + (5 * h + 3 * kv + 4 * inter + attn) * cb + method_bytes
    embed_and_head = 3 * h * rb + mask
    if cfg.gradient_checkpointing:
        return tokens * (layers * h * rb + per_layer + embed_and_head)
    return tokens * (layers * per_layer + embed_and_head)


def method_activation_bytes(cfg, model, layers: int) -> int:
    """Per token and layer, what the trained modules of ``cfg.method`` keep for backward (beyond the block's own).

    Per method: docs/speed-and-memory.md#memorymethod_activation_bytes.
    """
    cb = _dtype_bytes(cfg.bnb_4bit_compute_dtype)
    h = model.config.hidden_size
    total = 0
    for _, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            width_in, width_out = m.in_features, m.out_features
            total += width_in * cb + width_in + cfg.r * 4 + (width_out * cb if cfg.method == "dora" else 0)
        elif hasattr(m, "ia3_l") and "default" in getattr(m, "ia3_l", {}):
            total += (m.in_features if m.is_feedforward else m.out_features) * cb
        elif isinstance(m, BottleneckAdapter):
            width, b = m.up.out_features, m.down.out_features
            total += width * 4 * (2 if m.norm is not None else 1) + 2 * b * 4 + width * cb
    if cfg.method == "full":
        inter = getattr(model.config, "intermediate_size", 4 * h)
        total += (h + inter) * cb * layers
    return total // layers


def dora_transient_bytes(model) -> int:
    """DoRA recomputes its weight norm each forward: the largest target's weight (de-quantized) + B @ A, fp32."""
    sizes = [m.in_features * m.out_features for _, m in model.named_modules()
             if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector]
    return 2 * 4 * max(sizes, default=0)


def estimate(cfg, model_path: str, num_labels: int, train_max_len: int, eval_max_len: int,
             world_size: int = 1, zero_stage: int = 0) -> dict:
    """All figures of the dry-run, in bytes (per process)."""
    arch = meta_model(model_path, num_labels, cfg.trust_remote_code)
    plan_ = plan(cfg, arch)
    skip = list(plan_.head) if cfg.load_in_4bit else []  # what load_base_model keeps out of 4 bit
    weights = weight_breakdown(arch, cfg, skip)
    model = meta_trainable(cfg, model_path, num_labels)  # what --method trains, as training builds it
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    counts = parameter_counts(model)
    trainable, total = counts["trainable"], counts["total"]
    layers = arch.config.num_hidden_layers
    if cfg.method == "full":
        # The trained weights are the base weights (counted above, in their own dtypes); gradients and
        # torch AdamW's state take each parameter's dtype (fp32 head, compute dtype elsewhere).
        lora_bytes = 0
        compute = _dtype_bytes(cfg.bnb_4bit_compute_dtype)
        head = {id(p) for name in plan_.head for p in getattr(model, name).parameters()}
        grad_bytes = sum(p.numel() * (4 if id(p) in head else compute) for p in trainable_params)
    else:
        lora_bytes = grad_bytes = 4 * trainable
    opt_bytes = optimizer_state_bytes(trainable_params, cfg.optim)
    method_bytes = method_activation_bytes(cfg, model, layers)
    transient = weights["largest_dequantized_bytes"] + (dora_transient_bytes(model) if cfg.method == "dora" else 0)
    act_train = activation_bytes(arch.config, cfg.batch_size * train_max_len, train_max_len, cfg, True, method_bytes)
    act_train += transient
    act_eval = activation_bytes(arch.config, cfg.eval_batch_size * eval_max_len, eval_max_len, cfg, False, 0)
    act_eval += transient
    result = {
        "model_path": model_path, "method": cfg.method, "trainable_params": trainable, "total_params": total,
        "quantized_params": weights["quantized_params"], "modules_not_quantized": sorted(skip),
        "weights": weights, "weight_bytes": weights["weight_bytes"], "lora_bytes": lora_bytes,
        "gradient_bytes": grad_bytes, "optimizer_bytes": opt_bytes, "method_activation_bytes_per_token_layer": method_bytes,
        "train_tokens_per_batch": cfg.batch_size * train_max_len, "train_max_len": train_max_len,
        "eval_tokens_per_batch": cfg.eval_batch_size * eval_max_len, "eval_max_len": eval_max_len,
        "activation_bytes": act_train, "eval_activation_bytes": act_eval,
        "world_size": world_size, "zero_stage": zero_stage,
    }
    result["zero"] = {f"{stage}/{w}": per_process(result, stage, w)
                      for stage in (0, 1, 2, 3) for w in sorted({1, 2, 4, 8, world_size})}
    result["per_process_bytes"] = per_process(result, zero_stage, world_size)
    return result


def per_process(r: dict, stage: int, world: int) -> int:
    """Training peak per process under ZeRO ``stage`` (0 = plain DDP) on ``world`` processes."""
    sharded_from = {"weight_bytes": 3, "lora_bytes": 3, "gradient_bytes": 2, "optimizer_bytes": 1}  # ZeRO stage
    return int(sum(r[k] / (world if stage >= s else 1) for k, s in sharded_from.items()) + r["activation_bytes"])


def _fmt(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / MiB:8.1f} MiB"


TRAINED_ROW = {"qlora": "LoRA + head (fp32)", "lora": "LoRA + head (fp32)", "dora": "DoRA + head (fp32)",
               "ia3": "(IA)^3 vectors + head (fp32)", "adapter": "adapters + head (fp32)",
               "full": "trained weights (= the base weights above)"}


def report(r: dict, cfg, note: Optional[str] = None) -> str:
    w = r["weights"]
    lines = [
        f"memory dry-run for {r['model_path']}, --method {cfg.method} (no weights loaded)",
        f"  parameters: {r['trainable_params']:,} trainable of {r['total_params']:,} "
        f"({100 * r['trainable_params'] / r['total_params']:.3f}%); {r['quantized_params']:,} in 4-bit linears"
        if cfg.load_in_4bit else
        f"  parameters: {r['trainable_params']:,} trainable of {r['total_params']:,}",
        f"  compute dtype {cfg.bnb_4bit_compute_dtype}, optimizer {cfg.optim}, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, batch {cfg.batch_size} x {r['train_max_len']} tokens "
        f"(longest example), eval batch {cfg.eval_batch_size} x {r['eval_max_len']}",
    ]
    if note:
        lines.append(f"  note: {note}")
    rows = [
        ("base weights (total)", r["weight_bytes"]),
        ("  packed 4-bit values", w["packed_bytes"]),
        ("  quantization constants", w["quant_constant_bytes"]),
        ("  non-quantized params (fp32)" if cfg.load_in_4bit else "  params", w["other_param_bytes"]),
        (TRAINED_ROW[cfg.method].replace(" + head (fp32)", "") if cfg.causal_lm else TRAINED_ROW[cfg.method],
         r["lora_bytes"]),
        ("gradients" if cfg.method == "full" else "gradients (fp32)", r["gradient_bytes"]),
        ("optimizer state", r["optimizer_bytes"]),
        ("activations, training batch", r["activation_bytes"]),
        (f"per process, training (ZeRO-{r['zero_stage']}, {r['world_size']} proc)"
         if r["zero_stage"] else f"per process, training ({r['world_size']} proc)", r["per_process_bytes"]),
        ("evaluation activations", r["eval_activation_bytes"]),
    ]
    lines += [f"  {name:<44}{_fmt(value)}" for name, value in rows]
    worlds = sorted({int(k.split("/")[1]) for k in r["zero"]})
    lines += ["  training peak per process by ZeRO stage (columns: processes)",
              "  " + f"{'':<14}" + "".join(f"{w:>14}" for w in worlds)]
    for stage, label in ((0, "DDP / ZeRO-0"), (1, "ZeRO-1"), (2, "ZeRO-2"), (3, "ZeRO-3")):
        lines.append("  " + f"{label:<14}" + "".join(f"{_fmt(r['zero'][f'{stage}/{w}']):>14}" for w in worlds))
    return "\n".join(lines)


def resolve_gradient_checkpointing(cfg, model_path: str, num_labels: int, train_max_len: int, accelerator) -> None:
    """Turn ``--gradient_checkpointing auto`` into true/false on a GPU (the resolved value is what gets saved).

    ``TrainConfig.resolve_auto`` already took a resumed run's saved value and decided a CPU
    (off); what is left is a GPU: on when the dry-run estimate of a training step *without* it (per
    process, this launch's processes and ZeRO stage, batch x the longest training example) exceeds
    ``GPU_MEMORY_SHARE`` of the device's memory.
    """
    if cfg.gradient_checkpointing != "auto":
        return
    from accelerate.utils import broadcast_object_list

    without = estimate(dataclasses.replace(cfg, gradient_checkpointing=False), model_path, num_labels, train_max_len,
                       train_max_len, accelerator.num_processes, zero_stage(accelerator))["per_process_bytes"]
    capacity = torch.cuda.get_device_properties(accelerator.device).total_memory
    needed = without > GPU_MEMORY_SHARE * capacity
    # Every process must train the same way; the main process's device decides.
    cfg.gradient_checkpointing = bool(broadcast_object_list([needed])[0]) if accelerator.num_processes > 1 else needed
    log.info("gradient checkpointing %s: a training step without it needs ~%.1f GiB per process (dry-run "
             "estimate), against %.0f%% of %.1f GiB", "on" if cfg.gradient_checkpointing else "off", without / 2**30,
             100 * GPU_MEMORY_SHARE, capacity / 2**30)


def dry_run(cfg, source, template, splits: list[str], eval_split: str, accelerator) -> dict:
    """``ft.py --dry_run``: tokenize (for the real lengths), estimate, print, load no weights."""
    model_path, _ = resolve_paths(cfg)
    note = None
    try:
        _, tokenizer = tokenizer_for(cfg)
    except UsageError:
        tokenizer = None
        note = (f"no tokenizer in {cfg.tokenizer_dir or model_path}: sequence length taken as --max_length "
                f"{cfg.max_length} (give --tokenizer_dir for the real lengths)")
    if tokenizer is not None and cfg.objective != "classification":  # sft / lm: a causal LM, no head
        from qlora_cls.generative import prepare as prepare_generative
        data = prepare_generative(cfg, tokenizer)  # the same checks and lengths as training
        num_labels, train_max, eval_max = None, max(data.train.lengths), max(data.eval.lengths)
    elif tokenizer is not None:
        from qlora_cls.label_words import LabelWords
        all_splits = list(dict.fromkeys(list(splits) + [eval_split]))
        data = prepare_data(source, template, tokenizer, all_splits, cfg.max_length,
                            {s: cfg.max_train_samples for s in splits} | {eval_split: cfg.max_eval_samples},
                            accelerator, label_words=LabelWords.of(cfg))
        if cfg.causal_lm:  # --classifier label_words: the causal LM, no head; a prompt + its longest label
            num_labels = None
            longest = {s: max(len(p) + max(map(len, c)) for p, c in zip(b.prompt_ids, b.candidates))
                       for s, b in data.batchers.items()}
            train_max, eval_max = max(longest[s] for s in splits), longest[eval_split]
        else:
            num_labels = data.task.spec.num_labels
            train_max = max(max(data.batchers[s].lengths) for s in splits)
            eval_max = max(data.batchers[eval_split].lengths)
    elif cfg.causal_lm:  # sft / lm / label words, no tokenizer: the causal LM, --max_length
        num_labels, train_max, eval_max = None, cfg.max_length, cfg.max_length
    else:
        spec = GLUE_TASKS.get(cfg.task)
        num_labels = spec.num_labels if spec and not cfg.train_file else max(len(cfg.label_names or [0, 1]), 1)
        train_max = eval_max = cfg.max_length
    if cfg.classifier == "label_words":  # as ft.py refuses it, before the estimate
        from transformers import AutoConfig

        from qlora_cls.prefix import is_causal_decoder
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
        if not is_causal_decoder(config):
            raise UsageError(f"--classifier label_words scores words with a causal LM; {config.model_type} is not "
                             f"a causal decoder: use --classifier head")
    budget = resolve_param_budget(cfg, model_path, num_labels)  # as ft.py chooses it
    if budget and budget["field"]:
        note = ((note + "; ") if note else "") + (f"--param_budget {budget['budget']:,} chose --{budget['field']} "
                                                  f"{budget['value']} ({budget['trainable']:,} trainable)")
    resolve_gradient_checkpointing(cfg, model_path, num_labels, train_max, accelerator)  # auto: as ft.py decides
    r = estimate(cfg, model_path, num_labels, train_max, eval_max, accelerator.num_processes,
                 zero_stage(accelerator))
    if accelerator.is_main_process:
        print(report(r, cfg, note), flush=True)
    return {"dry_run": {**r, "param_budget": budget}}
