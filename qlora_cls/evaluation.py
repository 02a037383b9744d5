"""Prediction over a tokenized split, shared by ft.py (each epoch) and eval.py (any split/prompt).

Every process predicts its share of length-sorted batches with the *unwrapped* model (no DDP
collectives in forward), then the (row, logits) pairs are gathered and put back in dataset order.
The result has exactly one prediction per example whatever the process count; we assert it rather
than trust padding arithmetic.
"""
from __future__ import annotations

import time
import numpy as np
import torch

from .batching import eval_batches, padding_efficiency
from .data import Batcher
from .preflight import zero_stage
from .tasks import TaskSpec


@torch.inference_mode()
def predict(model, batcher: Batcher, batch_size: int, accelerator) -> tuple[np.ndarray, dict[str, float]]:
    """Logits for every row of ``batcher`` in dataset order, plus throughput figures."""
    was_training = model.training
    model.eval()
    batches = eval_batches(batcher.lengths, batch_size, accelerator.num_processes, accelerator.process_index)
    start = time.perf_counter()
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
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"].to(accelerator.device),
                           attention_mask=batch["attention_mask"].to(accelerator.device)).logits
        if i >= len(batches):
            continue
        outputs.append(logits.float())
        rows.extend(batch_rows)
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
    return result, stats


def probabilities(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    if spec.is_regression:
        return logits
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def prediction_table(spec: TaskSpec, label_names, batcher: Batcher, logits: np.ndarray):
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

