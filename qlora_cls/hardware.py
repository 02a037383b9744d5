"""What the machine computes fast: the rules behind ``--bnb_4bit_compute_dtype auto`` and
``--gradient_checkpointing auto``.

CPU feature flags misled twice about bf16 speed, so ``auto`` times a bf16 and a float32 GEMM of a 4-bit layer's
products (~0.5 s, cached per machine and set-up) and picks bf16 when it is ``BF16_MARGIN`` times as fast (it also
costs precision). Gradient checkpointing only saves memory (~1.4x a step): on only on a GPU whose memory the
dry-run estimate without it would exceed. Figures per CPU: docs/speed-and-memory.md#hardware-module.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from .files import atomic_write_json

log = logging.getLogger(__name__)

ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN's instruction-set cap: part of the probe's key
BF16_MARGIN = 1.5  # bf16 GEMMs must be this much faster than float32 for auto to pick bf16 on a CPU
# tokens x in x out of the probe's GEMMs: a SmolLM2-135M MLP projection at a batch of 8 x 32 tokens.
PROBE_SHAPE = (256, 576, 1536)
PROBE_FILE = "cpu_compute_dtype.json"  # under the cache home: one measurement per machine and set-up


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

    from .modeling import cache_home  # torch: this module imports it only where needed
    path = cache_home() / PROBE_FILE
    key = probe_key()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    record = known.get(key)
    cached = isinstance(record, dict) and all(isinstance(record.get(k), (int, float))
                                              for k in ("float32_gflops", "bfloat16_gflops"))
    if not cached:
        record = {"float32_gflops": round(gemm_gflops(torch.float32), 1),
                  "bfloat16_gflops": round(gemm_gflops(torch.bfloat16), 1), "shape": list(PROBE_SHAPE)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {**known, key: record})
        except OSError as exc:  # a read-only cache home only costs the next run another half second
            log.warning("could not cache the compute-dtype probe in %s: %s", path, exc)
    choice = choose_cpu_dtype(record["float32_gflops"], record["bfloat16_gflops"])
    if cached:
        log.info("compute dtype auto: %s (bf16 GEMMs %.0f GFLOP/s, float32 %.0f, measured once here, cached in %s)",
                 choice, record["bfloat16_gflops"], record["float32_gflops"], path)
    else:
        log.info("compute dtype auto: %s (bf16 GEMMs %.0f GFLOP/s, float32 %.0f, on %s; bf16 needs %.1fx)", choice,
                 record["bfloat16_gflops"], record["float32_gflops"], key, BF16_MARGIN)
    return {**record, "choice": choice, "key": key, "cached": cached}


def default_compute_dtype(device_type: str) -> str:
    """``auto``: bfloat16 on a GPU (the reference); on a CPU whichever the probe measured faster (with
    bf16 needing ``BF16_MARGIN``); float32 elsewhere."""
    if device_type == "cuda":
        return "bfloat16"
    return cpu_dtype_probe()["choice"] if device_type == "cpu" else "float32"
