"""Prediction over a tokenized split, shared by ft.py (each epoch) and eval.py (any split/prompt).

The canonical Accelerate evaluation (a length-sorted ``DataLoader``, the unwrapped model, ``gather_for_metrics``),
back in dataset order, one prediction per example asserted; ``fast=True`` runs through ``fast_eval``.
Details: docs/scale-out.md#evaluation-module.
"""
from __future__ import annotations

import time
from typing import Optional
import numpy as np
import torch
from torch.utils.data import DataLoader

from .batching import padding_efficiency
from .data import TokenizedSplit
from .preflight import zero_stage
from .tasks import TaskSpec


def eval_loader(split, batch_size: int, accelerator) -> tuple[list[int], DataLoader]:
    """Rows longest first (an out-of-memory shows at once; little padding) and their DataLoader, prepared by
    Accelerate. Its own generator, not the global one: evaluating must not shift training's random stream."""
    order = sorted(range(len(split)), key=lambda r: (-split.lengths[r], r))
    return order, accelerator.prepare_data_loader(
        DataLoader(split, batch_size=batch_size, sampler=order, collate_fn=split.collate, generator=torch.Generator()))


@torch.inference_mode()
def predict(model, batcher: TokenizedSplit, batch_size: int, accelerator,
            fast: bool = False, prepared: Optional[tuple] = None,
            stream_dtype: str = "float32") -> tuple[np.ndarray, dict[str, float]]:
    """Logits for every row of ``batcher`` in dataset order, plus throughput figures; for a
    ``label_words.LabelWordSplit`` each label's score (its log-likelihood after the prompt) instead.

    The time includes building the fast path's inference copy and prefix cache (it is part of the cost).
    ``prepared``: an inference copy built earlier for ``model`` (``fast_eval.inference_model``), reused.
    ``stream_dtype``: the fast path's residual stream, ``float32`` or ``compute`` (``--eval_stream_dtype``).
    """
    if getattr(batcher, "classifier", "head") == "label_words":  # label_words.LabelWordSplit: no head to run
        return batcher.score(model, batch_size, accelerator, fast, prepared, stream_dtype)
    was_training = model.training
    model.eval()
    order, loader = eval_loader(batcher, batch_size, accelerator)
    start = time.perf_counter()
    runner = None
    if fast:
        from .fast_eval import prepare
        runner = prepare(model, batcher.input_ids, accelerator.device, zero3=zero_stage(accelerator) == 3,
                         autocast=accelerator.autocast, prepared=prepared, stream_dtype=stream_dtype)
    outputs: list[torch.Tensor] = []
    for batch in loader:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with accelerator.autocast():
            logits = (runner.logits(ids, mask) if runner is not None else
                      model(input_ids=ids, attention_mask=mask).logits)
        outputs.append(accelerator.gather_for_metrics(logits.float()).cpu())
    info = runner.info if runner is not None else {}
    del runner  # the inference copy and prefix cache go now, before the next training step
    return in_dataset_order(outputs, order, batcher.lengths, batch_size, start, info if fast else None,
                            model if was_training else None)


def in_dataset_order(outputs: list, order, lengths, batch_size: int, start: float, info: Optional[dict],
                     retrain=None) -> tuple[np.ndarray, dict]:
    """The gathered per-batch outputs (rows longest first, ``eval_loader``'s order) put back in dataset order,
    one per example checked, and the throughput figures; ``info``: the fast path's figures (None: plain path);
    ``retrain``: the model to put back in training mode."""
    gathered = torch.cat(outputs).numpy()
    elapsed = time.perf_counter() - start
    n = len(order)
    if len(gathered) != n:
        raise RuntimeError(f"evaluation gathered {len(gathered)} predictions for {n} examples")
    result = np.empty_like(gathered)
    result[order] = gathered
    if retrain is not None:
        retrain.train()
    stats = {"eval_examples_per_s": n / elapsed, "eval_tokens_per_s": sum(lengths) / elapsed,
             "eval_seconds": elapsed, "eval_padding_efficiency": padding_efficiency(
                 [order[i:i + batch_size] for i in range(0, n, batch_size)], lengths)}
    if info is not None:
        stats.update({k: v for k, v in info.items() if not isinstance(v, str)})
        stats["eval_dequantized"] = str(info.get("eval_dequantized", "")).startswith("yes")
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

