"""What the machine computes fast: the rules behind ``--bnb_4bit_compute_dtype auto`` and
``--gradient_checkpointing auto``.

bf16 on a CPU is fast only where oneDNN runs the bf16 matrix products on AMX-BF16 tiles. Measured on
this project's CPU (``bench/profile_step.py --gemm``, one thread, the model's layer shapes): fp32
GEMMs ~175 GFLOP/s; bf16 with AMX ~1000 GFLOP/s (a training step 1.8x faster than fp32); bf16
with oneDNN capped at AVX512-BF16 (what a CPU with avx512_bf16 and no AMX has) ~100 GFLOP/s (a step
1.4x slower than fp32); at AVX512 without BF16, oneDNN's emulation, ~35; without AVX512 or with
oneDNN off, torch's reference kernel, 3-17 GFLOP/s (a step 15x slower, its backward 29x: the old
"bf16 is ~25x slower on CPU"). So ``auto`` picks bf16 on a CPU only with AMX-BF16 and oneDNN allowed to use it.

Gradient checkpointing only saves memory and costs a second forward (~1.4x a step). It is worth it
where the activations would not fit: on a GPU, ``auto`` turns it on when the dry-run estimate
(``qlora_cls/memory.py``) of a training step without it exceeds ``GPU_MEMORY_SHARE`` of the device's
memory; on a CPU it is off (RAM is not what is short there: ft.py trains the embedded model in
3.6 GiB of peak RSS without it, bench/results/20261125-134848).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("amx_bf16",)  # /proc/cpuinfo: the instructions that make bf16 faster than fp32 here
ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # a cap below AMX keeps oneDNN off the tiles
# The estimate is a floor: it leaves out the CUDA context, kernel workspaces and the caching allocator's
# slack, and the reference run reported ~18 GB per GPU against an estimate of 6.4-8.7 GiB (README,
# "Memory dry-run"). So checkpointing goes on unless the estimate without it fits in half the device.
GPU_MEMORY_SHARE = 0.5


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (Linux), else from torch's own CPU probes."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}


def cpu_bf16_support() -> dict:
    """Whether this CPU computes bf16 matrix products faster than fp32, and why (saved by bench/profile)."""
    import torch
    flags = cpu_flags()
    cap = next((os.environ[v] for v in ISA_CAP_VARS if os.environ.get(v)), None)
    # Without oneDNN torch's bf16 GEMM is its reference kernel whatever the CPU has.
    onednn = bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
    native = all(f in flags for f in NATIVE_BF16_FLAGS) and onednn and (cap is None or "AMX" in cap.upper())
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "onednn": onednn,
            "onednn_max_cpu_isa": cap, "native_bf16": native}


def default_compute_dtype(device_type: str) -> str:
    """``auto``: bfloat16 on a GPU (the reference) and on a CPU with AMX-BF16, float32 elsewhere."""
    if device_type == "cuda":
        return "bfloat16"
    return "bfloat16" if device_type == "cpu" and cpu_bf16_support()["native_bf16"] else "float32"


def resolve_gradient_checkpointing(cfg, model_path: str, num_labels: int, train_max_len: int, accelerator) -> None:
    """Turn ``--gradient_checkpointing auto`` into true/false on a GPU (the resolved value is what gets saved).

    ``TrainConfig.resolve_compute_dtype`` already took a resumed run's saved value and decided a CPU
    (off); what is left is a GPU: on when the dry-run estimate of a training step *without* it (per
    process, this launch's processes and ZeRO stage, batch x the longest training example) exceeds
    ``GPU_MEMORY_SHARE`` of the device's memory.
    """
    if cfg.gradient_checkpointing != "auto":
        return
    import dataclasses

    import torch
    from accelerate.utils import broadcast_object_list

    from .memory import estimate
    from .preflight import zero_stage
    without = estimate(dataclasses.replace(cfg, gradient_checkpointing=False), model_path, num_labels, train_max_len,
                       train_max_len, accelerator.num_processes, zero_stage(accelerator))["per_process_bytes"]
    capacity = torch.cuda.get_device_properties(accelerator.device).total_memory
    needed = without > GPU_MEMORY_SHARE * capacity
    # Every process must train the same way; the main process's device decides.
    cfg.gradient_checkpointing = bool(broadcast_object_list([needed])[0]) if accelerator.num_processes > 1 else needed
    log.info("gradient checkpointing %s: a training step without it needs ~%.1f GiB per process (dry-run "
             "estimate), against %.0f%% of %.1f GiB", "on" if cfg.gradient_checkpointing else "off", without / 2**30,
             100 * GPU_MEMORY_SHARE, capacity / 2**30)
