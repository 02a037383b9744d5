"""GLUE metrics through ``evaluate``, offline.

``evaluate.load("glue", task)`` fetches code from the hub; we load the same metric from the module
shipped in ``glue_metric/`` instead, so the numbers and names match the GLUE ones without a network.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .data import HIDDEN_LABEL
from .tasks import TaskSpec

METRIC_DIR = Path(__file__).resolve().parent / "glue_metric"


@lru_cache(maxsize=None)
def load_metric(config_name: str):
    import evaluate
    return evaluate.load(str(METRIC_DIR), config_name)


def metric_config_name(spec: TaskSpec) -> str:
    if spec.name == "custom":
        return "custom_regression" if spec.is_regression else "custom"
    return spec.name


def predictions_from_logits(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if spec.is_regression else logits.argmax(-1)


def compute_metrics(spec: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics of ``logits`` against ``labels``; ``{}`` when every label is hidden (-1)."""
    labels = np.asarray(labels)
    visible = labels != HIDDEN_LABEL
    if not visible.any():
        return {}
    preds = predictions_from_logits(spec, np.asarray(logits))
    metric = load_metric(metric_config_name(spec))
    result = metric.compute(predictions=preds[visible].tolist(), references=labels[visible].tolist())
    return {k: float(v) for k, v in result.items()}
