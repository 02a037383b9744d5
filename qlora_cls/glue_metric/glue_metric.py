"""GLUE metrics as an `evaluate` module that needs no network.

`evaluate.load("glue", task)` downloads its script from the hub; this file is the same metric
(same names, same numbers) computed with scikit-learn and SciPy, loaded with
`evaluate.load(<this folder>, task)`.
"""
import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte",
          "wnli", "hans", "custom", "custom_regression")


class GlueMetric(evaluate.Metric):
    def _info(self):
        if self.config_name not in _TASKS:
            raise KeyError(f"unknown GLUE task {self.config_name!r}; valid: {', '.join(_TASKS)}")
        dtype = "float32" if self.config_name in ("stsb", "custom_regression") else "int64"
        return evaluate.MetricInfo(
            description="GLUE metrics (offline)", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name in ("stsb", "custom_regression"):
            return {"pearson": float(pearsonr(references, predictions)[0]),
                    "spearmanr": float(spearmanr(references, predictions)[0])}
        accuracy = float(accuracy_score(references, predictions))
        if self.config_name in ("mrpc", "qqp"):
            return {"accuracy": accuracy, "f1": float(f1_score(references, predictions))}
        return {"accuracy": accuracy}
