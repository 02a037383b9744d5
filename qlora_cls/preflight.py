"""Refuse launch set-ups that are known to break, before any weights are loaded.

Each refusal says what, why and what to do, on one line. Returns whether ZeRO-3 is active (then the
model is placed by DeepSpeed, not by a per-process device map).
"""
from __future__ import annotations

import logging
import os

import torch

from .errors import UsageError

log = logging.getLogger(__name__)


def _deepspeed_plugin(accelerator):
    return getattr(accelerator.state, "deepspeed_plugin", None)


def zero_stage(accelerator) -> int:
    plugin = _deepspeed_plugin(accelerator)
    return int(plugin.zero_stage) if plugin is not None else 0


def check_launch_and_resolve(cfg, accelerator) -> bool:
    """Refuse a launch set-up known to break (one line each), and resolve what depends on the launch: it
    changes ``cfg`` (``--global_batch_size`` sets ``batch_size``) and, under DeepSpeed, fills the plugin's
    "auto" entries from it. Returns whether ZeRO-3 is active."""
    dist = str(accelerator.distributed_type)
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if launched != accelerator.num_processes:
        # e.g. DeepSpeed with several processes on a machine without GPUs: accelerate then sets every
        # process up as a world of one, and each would train its own copy while the engine expects N.
        raise UsageError(f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes} "
                         f"({dist}); several processes without GPUs need DDP (ACCELERATE_USE_CPU=1 accelerate launch "
                         f"--multi_gpu ...), DeepSpeed needs GPUs or a single process")
    zero3 = zero_stage(accelerator) == 3
    if "FSDP" in dist and cfg.optim.endswith("8bit"):
        raise UsageError(f"--optim {cfg.optim} does not work with FSDP (bitsandbytes 8-bit state cannot be sharded "
                         f"by FSDP); use --optim adamw_torch or launch with DeepSpeed/DDP")
    storage = cfg.bnb_4bit_quant_storage or "uint8"
    if zero3 and cfg.load_in_4bit and storage != cfg.bnb_4bit_compute_dtype:
        raise UsageError(f"ZeRO-3 with 4-bit weights needs --bnb_4bit_quant_storage equal to --bnb_4bit_compute_dtype "
                         f"({cfg.bnb_4bit_compute_dtype}), got {storage}: ZeRO-3 shards parameters by dtype and "
                         f"uint8 storage cannot be gathered; add --bnb_4bit_quant_storage {cfg.bnb_4bit_compute_dtype}")
    if cfg.bnb_4bit_compute_dtype == "bfloat16" and cfg.load_in_4bit and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise UsageError("--bnb_4bit_compute_dtype bfloat16 needs a GPU with bf16 support (Ampere or newer); "
                         "use --bnb_4bit_compute_dtype float32 (or float16, less stable)")
    if cfg.bnb_4bit_compute_dtype == "float16" and accelerator.mixed_precision == "bf16":
        raise UsageError("--bnb_4bit_compute_dtype float16 with bf16 mixed precision mixes two half formats; "
                         "use --bnb_4bit_compute_dtype bfloat16")
    if cfg.bnb_4bit_compute_dtype == "float16" and cfg.load_in_4bit:
        log.warning("fp16 compute is known to be unstable for QLoRA (loss spikes, NaN); prefer bfloat16")
    if accelerator.device.type == "cuda" and torch.cuda.device_count() and \
            accelerator.state.local_process_index >= torch.cuda.device_count():
        raise UsageError(f"{accelerator.num_processes} processes but only {torch.cuda.device_count()} GPUs on this "
                         f"machine; launch with --num_processes {torch.cuda.device_count()} per machine")
    if cfg.global_batch_size is not None:
        per_step = accelerator.num_processes * cfg.gradient_accumulation_steps
        if cfg.global_batch_size % per_step:
            raise UsageError(f"--global_batch_size {cfg.global_batch_size} does not divide by {accelerator.num_processes} "
                             f"processes x {cfg.gradient_accumulation_steps} accumulation steps = {per_step}; use a "
                             f"multiple of {per_step} or change --gradient_accumulation_steps")
        cfg.batch_size = cfg.global_batch_size // per_step
    plugin = _deepspeed_plugin(accelerator)
    if plugin is not None and cfg.skip_nonfinite:
        raise UsageError("--skip_nonfinite does not work under DeepSpeed: its engine takes the optimizer step inside "
                         "backward, before the loop can skip it; drop the flag (a non-finite step then stops the run)")
    if plugin is not None:
        _fill_deepspeed_auto(cfg, plugin, accelerator.num_processes)
    return zero3


def _fill_deepspeed_auto(cfg, plugin, world_size: int) -> None:
    """The run config is the single source of truth: "auto" entries take our values.

    Accelerate fills them from a prepared DataLoader; ours are plain batch lists (see batching.py).
    """
    ds = plugin.deepspeed_config
    values = {"train_micro_batch_size_per_gpu": cfg.batch_size,
              "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
              "gradient_clipping": cfg.max_grad_norm or 1e9}
    for key, value in values.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    expected = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    fixed = ds.get("train_batch_size", "auto")
    if fixed != "auto" and int(fixed) != expected:
        raise UsageError(f"DeepSpeed train_batch_size {fixed} != --batch_size {cfg.batch_size} x "
                         f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} x {world_size} processes "
                         f"= {expected}; set it to \"auto\" in the DeepSpeed config")
    ds["train_batch_size"] = expected
