"""What the machine computes fast: the rules behind ``--bnb_4bit_compute_dtype auto`` and
``--gradient_checkpointing auto``.

Whether bf16 beats float32 on a CPU is not written in its feature flags, so ``auto`` measures it: a
bf16 and a float32 GEMM of a 4-bit layer's two products (forward x @ W^T, backward dY @ W), at the
torch thread count the run uses, best of a few calls (~0.5 s), once per machine and set-up (the
result is cached under the cache home). bf16 is chosen when its GEMMs are at least ``BF16_MARGIN``
times as fast, since it also costs precision. The flags misled twice (one thread, the model's shapes,
README "Compute dtype and gradient checkpointing"):

- Intel Xeon with AMX-BF16: fp32 ~175 GFLOP/s, bf16 ~1000 (steps 1.5-1.8x faster in bf16); with
  oneDNN capped at AVX512-BF16 on that CPU, bf16 ~100 (steps 1.4x slower), which made the old rule
  ask for AMX;
- AMD EPYC with AVX512-BF16 and no AMX (2026-12-01): fp32 53-57 GFLOP/s (MKL), bf16 180-460
  (oneDNN): a training step 2.4x faster and evaluation 2.9x faster in bf16, where the AMX rule had
  picked float32;
- without AVX512 or with oneDNN off torch's reference bf16 kernel runs at 3-17 GFLOP/s (the old
  "bf16 is ~25x slower on CPU"); a GPU computes in bf16, the reference's dtype.

Gradient checkpointing only saves memory and costs a second forward (~1.4x a step). It is worth it
where the activations would not fit: on a GPU, ``auto`` turns it on when the dry-run estimate
(``qlora_cls/memory.py``) of a training step without it exceeds ``GPU_MEMORY_SHARE`` of the device's
memory; on a CPU it is off (RAM is not what is short there: ft.py trains the embedded model in
3.6 GiB of peak RSS without it, bench/results/20261125-134848).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN's instruction-set cap: part of the probe's key
BF16_MARGIN = 1.5  # bf16 GEMMs must be this much faster than float32 for auto to pick bf16 on a CPU
# tokens x in x out of the probe's GEMMs: a SmolLM2-135M MLP projection at a batch of 8 x 32 tokens.
PROBE_SHAPE = (256, 576, 1536)
PROBE_FILE = "cpu_compute_dtype.json"  # under the cache home: one measurement per machine and set-up
# The estimate is a floor: it leaves out the CUDA context, kernel workspaces and the caching allocator's
# slack, and the reference run reported ~18 GB per GPU against an estimate of 6.4-8.7 GiB (README,
# "Memory dry-run"). So checkpointing goes on unless the estimate without it fits in half the device.
GPU_MEMORY_SHARE = 0.5


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (Linux), else from torch's own CPU probes."""
    flags = _cpuinfo().get("flags")
    if flags is not None:
        return set(flags.split())
    import torch
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}


def cpu_bf16_support() -> dict:
    """The CPU's bf16 instructions and oneDNN's state (recorded by the benchmarks beside the probe)."""
    import torch
    flags = cpu_flags()
    cap = next((os.environ[v] for v in ISA_CAP_VARS if os.environ.get(v)), None)
    onednn = bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "onednn": onednn,
            "onednn_max_cpu_isa": cap}


def cpu_model_name() -> str:
    """The CPU's name as ``/proc/cpuinfo`` gives it, with its family, model and stepping (see ``cpu_name``)."""
    name = cpu_name(_cpuinfo())
    if name:
        return name
    import platform
    return platform.processor() or platform.machine()


def cpuinfo_fields(cpuinfo: str) -> dict:
    """The ``key: value`` lines of the first CPU's block of a ``/proc/cpuinfo`` text."""
    fields: dict = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # a blank line ends the first CPU's block
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpuinfo() -> dict:
    try:
        return cpuinfo_fields(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        return {}


def cpu_name(fields: dict) -> Optional[str]:
    """``model name`` of the first CPU (``cpuinfo_fields``), followed by its ``cpu family``, ``model`` and
    ``stepping`` when given. A virtual machine may report only a vendor's line name: two machines here
    both said ``AMD EPYC``, and their bf16 GEMMs ran at 431 and 180 GFLOP/s (family 25 model 17 is the
    second); the numbers tell them apart in the compute-dtype probe's cache and the benchmark records."""
    name = fields.get("model name")
    if not name:
        return None
    signature = " ".join(f"{label} {fields[k]}" for k, label in (("cpu family", "family"), ("model", "model"),
                                                                  ("stepping", "stepping")) if fields.get(k))
    return f"{name} ({signature})" if signature else name


def gemm_gflops(dtype, repeats: int = 5) -> float:
    """GFLOP/s of a 4-bit layer's forward and backward products in ``dtype`` (torch's own kernels, as
    bitsandbytes calls them after de-quantizing), best of ``repeats`` after one warm-up call each."""
    import time

    import torch
    tokens, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*shape, generator=g).to(dtype) for shape in ((tokens, k), (n, k), (tokens, n)))
    seconds = 0.0
    for product in (lambda: torch.nn.functional.linear(x, w), lambda: dy @ w):
        product()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        seconds += best
    return 2 * 2 * tokens * k * n / seconds / 1e9


def choose_cpu_dtype(float32_gflops: float, bfloat16_gflops: float) -> str:
    return "bfloat16" if bfloat16_gflops >= BF16_MARGIN * float32_gflops else "float32"


def probe_key() -> str:
    """What the measurement depends on: CPU, torch, threads, oneDNN on/off and its instruction-set cap."""
    import torch
    support = cpu_bf16_support()
    return (f"{cpu_model_name()} | avx512_bf16={support['avx512_bf16']} amx_bf16={support['amx_bf16']} | "
            f"torch {torch.__version__} | threads {torch.get_num_threads()} | onednn={support['onednn']} "
            f"cap={support['onednn_max_cpu_isa']}")


def cpu_dtype_probe() -> dict:
    """The measured float32 and bf16 GEMM rates here and the dtype ``auto`` picks from them; measured once
    per ``probe_key()`` and cached in ``<cache home>/cpu_compute_dtype.json`` (``cached`` says which)."""
    import torch

    from .files import atomic_write_json
    from .modeling import cache_home
    path = cache_home() / PROBE_FILE
    key = probe_key()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float))
                                       for k in ("float32_gflops", "bfloat16_gflops")):
        choice = choose_cpu_dtype(entry["float32_gflops"], entry["bfloat16_gflops"])
        log.info("compute dtype auto: %s (bf16 GEMMs %.0f GFLOP/s, float32 %.0f, measured once here, cached in %s)",
                 choice, entry["bfloat16_gflops"], entry["float32_gflops"], path)
        return {**entry, "choice": choice, "key": key, "cached": True}
    known = known if isinstance(known, dict) else {}
    record = {"float32_gflops": round(gemm_gflops(torch.float32), 1),
              "bfloat16_gflops": round(gemm_gflops(torch.bfloat16), 1), "shape": list(PROBE_SHAPE)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**known, key: record})
    except OSError as exc:  # a read-only cache home only costs the next run another half second
        log.warning("could not cache the compute-dtype probe in %s: %s", path, exc)
    choice = choose_cpu_dtype(record["float32_gflops"], record["bfloat16_gflops"])
    log.info("compute dtype auto: %s (bf16 GEMMs %.0f GFLOP/s, float32 %.0f, on %s; bf16 needs %.1fx)", choice,
             record["bfloat16_gflops"], record["float32_gflops"], key, BF16_MARGIN)
    return {**record, "choice": choice, "key": key, "cached": False}


def default_compute_dtype(device_type: str) -> str:
    """``auto``: bfloat16 on a GPU (the reference); on a CPU whichever the probe measured faster (with
    bf16 needing ``BF16_MARGIN``); float32 elsewhere."""
    if device_type == "cuda":
        return "bfloat16"
    return cpu_dtype_probe()["choice"] if device_type == "cpu" else "float32"


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
