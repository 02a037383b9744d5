"""What each GLUE task looks like: its text columns, label space, evaluation split and metrics."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 means regression (one output, MSE loss)
    metrics: tuple[str, ...]  # the first one selects the best epoch
    validation_split: str = "validation"
    test_split: str = "test"
    extra_eval_splits: tuple[str, ...] = ()  # also evaluated at the end of a run (MNLI: mismatched genres)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", ("sentence",), 2, ("matthews_correlation",)),  # as GLUE scores it
    "sst2": TaskSpec("sst2", ("sentence",), 2, ("accuracy",)),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": TaskSpec("qqp", ("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), 3, ("accuracy",),
                     validation_split="validation_matched", test_split="test_matched",
                     extra_eval_splits=("validation_mismatched",)),
    "qnli": TaskSpec("qnli", ("question", "sentence"), 2, ("accuracy",)),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": TaskSpec("wnli", ("sentence1", "sentence2"), 2, ("accuracy",)),
}


def custom_task(text_columns: list[str], num_labels: int) -> TaskSpec:
    """A task read from local CSV/JSON files: accuracy for classification, correlations for regression."""
    metrics = ("pearson", "spearmanr") if num_labels == 1 else ("accuracy",)
    return TaskSpec("custom", tuple(text_columns), num_labels, metrics)
