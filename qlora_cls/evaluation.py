"""Prediction over a tokenized split, shared by ft.py (each epoch) and eval.py (any split/prompt).

Every process predicts its share of length-sorted batches with the *unwrapped* model (no DDP
collectives in forward), then the (row, logits) pairs are gathered and put back in dataset order.
The result has exactly one prediction per example whatever the process count; we assert it rather
than trust padding arithmetic.

With ``fast=True`` (``--fast_eval``, the default) the forwards run through ``fast_eval``: a copy of
the model with its 4-bit weights de-quantized once (and float32 LoRA merged) when memory allows, and
for decoders the template's shared token prefix computed once; the argmax is the old path's and the
logits agree within float rounding (README "Merged models, fast evaluation, latency").
"""
from __future__ import annotations

import time
from typing import Optional
import numpy as np
import torch

from .batching import eval_batches, padding_efficiency
from .data import TokenizedSplit
from .preflight import zero_stage
from .tasks import TaskSpec


@torch.inference_mode()
def predict(model, batcher: TokenizedSplit, batch_size: int, accelerator,
            fast: bool = False, prepared: Optional[tuple] = None,
            stream_dtype: str = "float32") -> tuple[np.ndarray, dict[str, float]]:
    """Logits for every row of ``batcher`` in dataset order, plus throughput figures.

    The time includes building the fast path's inference copy and prefix cache (it is part of the cost).
    ``prepared``: an inference copy built earlier for ``model`` (``fast_eval.inference_model``), reused.
    ``stream_dtype``: the fast path's residual stream, ``float32`` or ``compute`` (``--eval_stream_dtype``).
    """
    was_training = model.training
    model.eval()
    batches = eval_batches(batcher.lengths, batch_size, accelerator.num_processes, accelerator.process_index)
    start = time.perf_counter()
    runner = None
    if fast:
        from .fast_eval import prepare
        runner = prepare(model, batcher.input_ids, accelerator.device, zero3=zero_stage(accelerator) == 3,
                         autocast=accelerator.autocast, prepared=prepared, stream_dtype=stream_dtype)
    rows: list[int] = []
    outputs: list[torch.Tensor] = []
    # Under ZeRO-3 every forward gathers the sharded weights collectively, so all processes must run
    # the same number of forwards: a process with fewer batches repeats one and discards the output.
    padded = list(batches)
    if zero_stage(accelerator) == 3 and accelerator.num_processes > 1:
        most = max(len(eval_batches(batcher.lengths, batch_size, accelerator.num_processes, r))
                   for r in range(accelerator.num_processes))
        padded += [batches[0] if batches else [0]] * (most - len(batches))
    for i, batch_rows in enumerate(padded):
        batch = batcher(batch_rows)
        ids, mask = batch["input_ids"].to(accelerator.device), batch["attention_mask"].to(accelerator.device)
        with accelerator.autocast():
            logits = (runner.logits(ids, mask) if runner is not None else
                      model(input_ids=ids, attention_mask=mask).logits)
        if i >= len(batches):
            continue
        outputs.append(logits.float())
        rows.extend(batch_rows)
    info = runner.info if runner is not None else {}
    del runner  # the inference copy and prefix cache go now, before the next training step
    local = torch.cat(outputs).cpu().numpy() if outputs else np.zeros((0, 0), dtype=np.float32)
    # One object per process; gather_for_metrics with objects returns them all, in rank order.
    shards = accelerator.gather_for_metrics([(rows, local)], use_gather_object=True)
    elapsed = time.perf_counter() - start
    n = len(batcher)
    num_outputs = next(s[1].shape[1] for s in shards if len(s[0]))
    result = np.zeros((n, num_outputs), dtype=np.float32)
    seen = np.zeros(n, dtype=np.int64)
    for shard_rows, shard_logits in shards:
        result[shard_rows] = shard_logits
        np.add.at(seen, shard_rows, 1)
    if not (seen == 1).all():
        raise RuntimeError(f"evaluation produced {int(seen.sum())} predictions for {n} examples "
                           f"({int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated)")
    if was_training:
        model.train()
    tokens = sum(batcher.lengths)
    all_batches = [b for b in eval_batches(batcher.lengths, batch_size)]
    stats = {"eval_examples_per_s": n / elapsed, "eval_tokens_per_s": tokens / elapsed, "eval_seconds": elapsed,
             "eval_padding_efficiency": padding_efficiency(all_batches, batcher.lengths)}
    if fast:
        stats.update({k: v for k, v in info.items() if not isinstance(v, str)})
        stats["eval_dequantized"] = info["eval_dequantized"].startswith("yes")
    return result, stats


def probabilities(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    if spec.is_regression:
        return logits
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def prediction_table(spec: TaskSpec, label_names, batcher: TokenizedSplit, logits: np.ndarray):
    """Header and rows of predictions_*.csv: idx, label, prediction, per-class probabilities or the score."""
    labels = batcher.labels.numpy()
    if spec.is_regression:
        header = ["idx", "label", "prediction"]
        rows = [[i, float(l), float(s)] for i, l, s in zip(batcher.idx, labels, logits[:, 0])]
        return header, rows
    probs = probabilities(spec, logits)
    header = ["idx", "label", "prediction"] + [f"prob_{name}" for name in label_names]
    rows = [[i, int(l), int(p.argmax())] + [f"{x:.6f}" for x in p] for i, l, p in zip(batcher.idx, labels, probs)]
    return header, rows

