"""Prediction latency: wall time of one forward call at small batch sizes, as a served model sees it.

Measured after training on the final model (metrics.json ``latency``), on the run's own eval examples
in dataset order (not length-sorted: a server does not choose its requests), after warm-up calls that
are not timed. The CPU repack guard stays on (the model is the training model in eval mode).
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import numpy as np
import torch

WARMUP = 2


def timed_calls(forward, batches: Sequence[dict], warmup: int = WARMUP) -> list[float]:
    """Seconds per call of ``forward(**batch)`` for each batch after the first ``warmup`` (not timed)."""
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        forward(**batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in 0..100): the smallest value with at least q % of the values at or below it
    (a time some call really took, as latency reports give it; bench/latency.py uses the same)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(times: Sequence[float], batch_size: int) -> dict:
    ms = [t * 1000.0 for t in times]
    return {"median_ms": float(np.median(ms)), "p95_ms": float(percentile(ms, 95)), "calls": len(ms),
            "median_ms_per_example": float(np.median(ms)) / batch_size}


@torch.inference_mode()
def measure_latency(model, batcher, accelerator, batch_sizes: Sequence[int] = (1, 8), calls: int = 20,
                    collective: bool = False) -> Optional[dict]:
    """{"batch_<n>": {"median_ms", "p95_ms", "calls", "median_ms_per_example"}} on the main process, else None.

    ``collective`` (ZeRO-3: a forward gathers sharded weights on every process) or ``calls == 0``: not
    measured (None). Batch sizes larger than the eval split are left out.
    """
    if calls <= 0 or collective:
        return None
    result = None
    if accelerator.is_main_process:
        was_training = model.training
        model.eval()
        n, result = len(batcher), {}

        def forward(input_ids, attention_mask, labels=None):
            with accelerator.autocast():
                return model(input_ids=input_ids.to(accelerator.device),
                             attention_mask=attention_mask.to(accelerator.device))

        collate, call = batcher, forward
        if getattr(batcher, "classifier", "head") == "label_words":  # a call scores every label of the batch
            from .label_words import scoring_call
            call, collate = scoring_call(model, batcher, accelerator)
        for size in batch_sizes:
            if size > n:
                continue
            starts = [(c * size) % (n - size + 1) for c in range(WARMUP + calls)]
            batches = [collate(list(range(s, s + size))) for s in starts]
            result[f"batch_{size}"] = summarize(timed_calls(call, batches), size)
        if was_training:
            model.train()
    accelerator.wait_for_everyone()
    return result
