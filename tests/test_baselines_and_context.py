"""Issue 12: the trivial baseline, the run's context, the model card, TensorBoard names and the plots' axes.

Oracles are independent of qlora_cls/records.py: counts by hand on small known label lists, and for the
real entry points the labels read straight from the parquet files / predictions CSV and scored by hand.
"""
import csv
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import eval as eval_cli
import ft
import report
from conftest import tiny_args

from qlora_cls import records as rec
from qlora_cls.tasks import GLUE_TASKS


# -- the baseline on small known label lists ------------------------------------------------------------
def test_majority_class_from_training_labels_scored_by_hand():
    spec = GLUE_TASKS["mrpc"]
    rule = rec.baseline_rule(spec, [1, 1, 1, 0, 0], ["not_equivalent", "equivalent"])
    assert rule["prediction"] == 1 and rule["prediction_name"] == "equivalent"
    assert rule["train_label_counts"] == {"not_equivalent": 2, "equivalent": 3}
    assert rule["train_loss"] == pytest.approx(-(0.4 * math.log(0.4) + 0.6 * math.log(0.6)))
    # eval: 5 of 8 equivalent -> accuracy 5/8; always-positive: precision 5/8, recall 1 -> F1 = 10/13
    b = rec.score_baseline(spec, rule, [1, 0, 1, 1, 0, 0, 1, 1])
    assert b["eval_examples"] == 8
    assert b["metrics"]["accuracy"] == pytest.approx(5 / 8) and b["metrics"]["f1"] == pytest.approx(10 / 13)


def test_majority_is_chosen_on_training_not_eval_labels_and_f1_of_never_positive_is_zero():
    spec = GLUE_TASKS["mrpc"]
    rule = rec.baseline_rule(spec, [0, 0, 1], None)
    b = rec.score_baseline(spec, rule, [0, 1, 1, 1])  # eval is mostly 1: the baseline still says 0
    assert rule["prediction"] == 0 and b["metrics"] == {"accuracy": 0.25, "f1": 0.0}
    assert rec.baseline_rule(spec, [0, 1, 1, 0], None)["prediction"] == 0  # tie: the lowest label id


def test_constant_mcc_is_zero_and_hidden_labels_are_not_scored():
    cola = GLUE_TASKS["cola"]
    b = rec.score_baseline(cola, rec.baseline_rule(cola, [1, 1, 0], None), [0, 1, 1, 0, 1])
    assert b["metrics"] == {"matthews_correlation": 0.0}
    mnli = GLUE_TASKS["mnli"]
    b = rec.score_baseline(mnli, rec.baseline_rule(mnli, [2, 2, 1, 0, 2], None), [2, 0, -1, 1, 2])
    assert b["prediction"] == 2 and b["eval_examples"] == 4 and b["metrics"]["accuracy"] == 0.5
    assert rec.score_baseline(mnli, rec.baseline_rule(mnli, [1], None), [-1, -1])["metrics"] == {}


def test_regression_baseline_is_the_training_mean_with_undefined_correlations():
    spec = GLUE_TASKS["stsb"]
    rule = rec.baseline_rule(spec, [1.0, 2.0, 3.0, 6.0], None)
    assert rule["prediction"] == 3.0 and rule["train_loss"] == pytest.approx(3.5)  # (4 + 1 + 0 + 9) / 4
    b = rec.score_baseline(spec, rule, [2.0, 4.0])
    assert b["metrics"] == {"pearson": None, "spearmanr": None, "mse": 1.0}
    json.dumps(b, allow_nan=False)  # no NaN in a JSON file
    # regression is compared on MSE: 0.5 < 1.0 beats it
    cmp = rec.compare(spec, {"pearson": 0.9}, b, mse=0.5)
    assert cmp == {"metric": "mse", "model": 0.5, "baseline": 1.0, "beats": True, "margin": 0.5}


def test_beating_means_strictly_better_on_the_main_metric():
    spec = GLUE_TASKS["mrpc"]
    base = {"metrics": {"accuracy": 0.625, "f1": 0.77}, "description": "always predicts 'x'", "eval_examples": 8}
    assert rec.compare(spec, {"accuracy": 0.75, "f1": 0.1}, base)["beats"] is True
    same = rec.compare(spec, {"accuracy": 0.625, "f1": 0.9}, base)
    assert same["beats"] is False and "does not beat" in rec.warning_text(same, base, "validation")
    assert rec.warning_text(rec.compare(spec, {"accuracy": 0.75}, base), base, "validation") is None


# -- the real entry points on the tiny model -----------------------------------------------------------
def _parquet_labels(mrpc, split, n):
    import pandas as pd
    return [int(x) for x in pd.read_parquet(Path(mrpc) / "mrpc" / f"{split}-00000-of-00001.parquet")["label"][:n]]


def _by_hand(train, evaluated):
    """accuracy/F1 of always answering the training majority (positive class = 1), counted by hand."""
    majority = Counter(train).most_common(1)[0][0] if Counter(train)[0] != Counter(train)[1] else 0
    correct = sum(1 for y in evaluated if y == majority)
    acc = correct / len(evaluated)
    if majority == 1:
        f1 = 2 * acc / (1 + acc)  # precision = accuracy, recall = 1
    else:
        f1 = 0.0
    return majority, acc, f1


@pytest.fixture(scope="module")
def run(tiny_model, mrpc, tmp_path_factory):
    path = tmp_path_factory.mktemp("ctx") / "ctx-run"
    summary = ft.main(tiny_args(tiny_model, mrpc, path, "--epochs", "2", "--max_steps", "8"))
    return path, summary


def test_metrics_and_config_carry_the_baseline_and_what_was_run(run, tiny_model, mrpc):
    path, summary = run
    metrics = json.loads((path / "metrics.json").read_text())
    config = json.loads((path / "config.json").read_text())
    train = _parquet_labels(mrpc, "train", 48)
    with open(path / "predictions_validation.csv") as f:
        evaluated = [int(r["label"]) for r in csv.DictReader(f)]
    assert evaluated == _parquet_labels(mrpc, "validation", 37)
    majority, acc, f1 = _by_hand(train, evaluated)
    for b in (metrics["baseline"], config["resolved"]["baseline"]):
        assert b["kind"] == "majority_class" and b["prediction"] == majority and b["eval_examples"] == 37
        assert b["train_examples"] == 48 and sum(b["train_label_counts"].values()) == 48
        assert b["metrics"]["accuracy"] == pytest.approx(acc) and b["metrics"]["f1"] == pytest.approx(f1)
    vs = metrics["vs_baseline"]
    assert vs["metric"] == "accuracy" and vs["model"] == metrics["final"]["accuracy"]
    assert vs["beats"] == (metrics["final"]["accuracy"] > acc)
    # what was run, first in both files: 48 examples / batch 8 = 6 steps per epoch; 8 steps = 1 epoch + 2 steps
    assert list(config)[0] == "run" and list(metrics)[0] == "run"
    r = metrics["run"]
    assert r["model"] == tiny_model and r["task"] == "mrpc" and r["prompt"] == "perfect"
    assert r["steps"] == 8 and r["steps_per_epoch"] == 6 and r["epochs_trained"] == pytest.approx(8 / 6, abs=1e-4)
    assert r["examples_seen"] == 48 + 2 * 8 and r["train_examples"] == 48
    assert r["eval_split"] == "validation" and r["eval_examples"] == 37 and r["evaluations"] == 2
    assert "--max_steps 8" in r["training"] and "--epochs is ignored" in r["training"]
    assert "LoRA r=8" in r["method"] and "q_proj, v_proj" in r["method"] and "NF4" in r["method"]
    assert config["run"]["training"].startswith("planned: 8 optimizer steps")
    assert metrics["best_step"] == metrics["epochs"][metrics["best_epoch"]]["step"]


def test_eval_scores_the_baseline_on_its_own_examples(run, mrpc, caplog):
    path, _ = run
    caplog.set_level("WARNING", logger="eval")
    result = eval_cli.main(["--results_path", str(path), "--split", "test", "--max_eval_samples", "20",
                            "--prompt", "none"])
    majority, acc, f1 = _by_hand(_parquet_labels(mrpc, "train", 48), _parquet_labels(mrpc, "test", 20))
    written = json.loads((path / "evals/test-none/metrics.json").read_text())
    assert written["baseline"]["prediction"] == majority and written["baseline"]["eval_examples"] == 20
    assert written["baseline"]["metrics"]["accuracy"] == pytest.approx(acc)
    assert written["baseline"]["metrics"]["f1"] == pytest.approx(f1)
    assert written["run"]["eval_examples"] == 20 and written["run"]["eval_split"] == "test"
    assert written["vs_baseline"]["beats"] == (result["metrics"]["accuracy"] > acc)
    warned = [r for r in caplog.records if "does not beat the trivial baseline" in r.getMessage()]
    assert len(warned) == (0 if written["vs_baseline"]["beats"] else 1)


def test_eval_of_a_run_saved_before_baselines_reads_the_training_labels_again(run, mrpc, tmp_path):
    import shutil
    path, _ = run
    old = tmp_path / "old-run"
    shutil.copytree(path, old, ignore=shutil.ignore_patterns("evals"))
    records = json.loads((old / "config.json").read_text())
    del records["resolved"]["baseline"], records["run"]
    (old / "config.json").write_text(json.dumps(records))
    eval_cli.main(["--results_path", str(old)])
    written = json.loads((old / "evals/validation-perfect/metrics.json").read_text())
    majority, acc, f1 = _by_hand(_parquet_labels(mrpc, "train", 48), _parquet_labels(mrpc, "validation", 37))
    assert written["baseline"]["prediction"] == majority and written["baseline"]["train_examples"] == 48
    assert written["baseline"]["metrics"]["accuracy"] == pytest.approx(acc)


def test_ft_logs_one_warning_line_when_the_run_does_not_beat_the_baseline(tiny_model, mrpc, tmp_path, caplog):
    caplog.set_level("INFO", logger="ft")
    summary = ft.main(tiny_args(tiny_model, mrpc, tmp_path / "r", "--max_steps", "2"))
    warned = [r.getMessage() for r in caplog.records if "does not beat the trivial baseline" in r.getMessage()]
    assert len(warned) == (0 if summary["vs_baseline"]["beats"] else 1)
    if warned:
        assert "\n" not in warned[0] and "37 validation examples" in warned[0]
    assert any("trivial baseline on the 37 validation examples" in r.getMessage() for r in caplog.records)


def test_model_card_is_filled_and_its_stock_peft_snippet_reproduces_the_predictions(run, tiny_model, mrpc):
    import pandas as pd
    import yaml
    path, _ = run
    for which in ("adapter", "adapter_best"):
        if not (path / which).is_dir():
            continue
        card = (path / which / "README.md").read_text()
        assert "More Information Needed" not in card
        header = yaml.safe_load(card.split("---")[1])
        assert header["library_name"] == "peft" and header["base_model"] == tiny_model
        assert "text-classification" in header["tags"] and header["pipeline_tag"] == "text-classification"
        for text in ("NF4", "not_equivalent", "equivalent", "Does sentence 1 mean the same", "trivial baseline",
                     "python ft.py", "--max_steps 8", "AutoPeftModelForSequenceClassification",
                     f"python eval.py --results_path {path}", "modules_to_save"):
            assert text in card, (which, text)
        assert "predict.py" not in card  # does not exist (yet)
    card = (path / "adapter" / "README.md").read_text()
    metrics = json.loads((path / "metrics.json").read_text())
    assert f"{metrics['baseline']['metrics']['accuracy']:.4f}" in card
    assert f"{metrics['final']['accuracy']:.4f}" in card
    # The card's own code, run as written (only `rows` filled with the 37 validation examples).
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    df = pd.read_parquet(Path(mrpc) / "mrpc" / "validation-00000-of-00001.parquet").head(37)
    code = re.sub(r"^rows = .*$", "rows = ROWS", code, flags=re.M)
    ns = {"ROWS": [{"sentence1": a, "sentence2": b} for a, b in zip(df.sentence1, df.sentence2)]}
    exec(compile(code, "model-card-snippet", "exec"), ns)
    probs = ns["logits"].softmax(-1).numpy()
    with open(path / "predictions_validation.csv") as f:
        ref = np.array([[float(r["prob_not_equivalent"]), float(r["prob_equivalent"])] for r in csv.DictReader(f)])
    assert np.abs(probs - ref).max() < 2e-3
    assert [ns["labels"][i] for i in ref.argmax(-1)] == ns["predictions"]


def test_tensorboard_run_named_after_its_folder_with_baseline_and_resolved_hparams(run):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    path, _ = run
    mux = EventMultiplexer().AddRunsFromDirectory(str(path.parent))  # tensorboard --logdir results
    mux.Reload()
    assert mux.Runs() and set(mux.Runs()) == {path.name}
    tags = mux.GetAccumulator(path.name).Tags()
    names = set(tags.get("scalars", [])) | set(tags.get("tensors", []))
    assert {"eval/accuracy", "eval/baseline_accuracy", "train/loss", "train/baseline_loss"} <= names
    # HParams (experiment, session start and end) in the run's one event file, not in a sub-folder of their own
    assert len(list(path.glob("events.out.tfevents.*"))) == 1 and not list(path.glob("*/events.out.tfevents.*"))
    assert len(mux.GetAccumulator(path.name).PluginTagToContent("hparams")) == 3
    # resolved values, not "none": bnb_4bit_quant_storage as quant_config.json has it
    records = json.loads((path / "config.json").read_text())
    quant = json.loads((path / "quant_config.json").read_text())
    from qlora_cls.config import TrainConfig
    cfg = TrainConfig(**records["config"])
    h = rec.hparams(cfg, records["resolved"], quant, ["bnb_4bit_quant_storage", "max_steps"])
    assert list(h)[:2] == ["bnb_4bit_quant_storage", "max_steps"]
    assert h["bnb_4bit_quant_storage"] == quant["bnb_4bit_quant_storage"] == "uint8" and h["max_steps"] == 8
    assert "none" not in h.values()


def test_report_names_what_was_run_and_draws_the_baseline(run, tmp_path, monkeypatch):
    from qlora_cls import plots
    path, _ = run
    limits = {}
    save = plots._save

    def capture(fig, p):
        ax = fig.axes[0]
        limits[Path(p).name] = (ax.get_xlim(), ax.get_ylim(), [ln.get_label() for ln in ax.get_lines()])
        return save(fig, p)
    monkeypatch.setattr(plots, "_save", capture)
    out = report.main([str(path), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "report.md").read_text()
    metrics = json.loads((path / "metrics.json").read_text())
    b = metrics["baseline"]["metrics"]
    assert md.index("## What was run") < md.index("## Configurations")
    for text in ("**Model:**", "mrpc", "perfect",
                 "8 optimizer steps", "1.33 epochs of 48 training examples", "64 examples seen",
                 "37 examples of the validation split", f"{b['accuracy']:.4f}", "trivial baseline: always"):
        assert text in md, text
    with open(tmp_path / "rep" / "report.csv") as f:
        rows = {r["configuration"]: r for r in csv.DictReader(f)}
    row = rows["all runs"]
    assert float(row["baseline_accuracy"]) == pytest.approx(b["accuracy"])
    assert row["steps"] == "8" and row["eval_examples"] == "37" and row["evaluations"] == "2"
    assert row["beats_baseline"] == str(metrics["vs_baseline"]["beats"])
    assert any(k.startswith("trivial baseline") for k in rows)
    warned = "does not beat the trivial baseline" in md
    assert warned == (not metrics["vs_baseline"]["beats"]) and bool(out["below_baseline"]) == warned
    # every figure draws the baseline; the eval axis is at least 0.3 wide and contains the baseline;
    # the bars start at zero and end at 1 for accuracy
    x, y, labels = limits["eval_per_epoch.png"]
    assert any(label.startswith("trivial baseline") for label in labels)
    assert y[1] - y[0] >= 0.3 - 1e-9 and y[0] <= b["accuracy"] <= y[1]
    x, y, labels = limits["final_metric.png"]
    assert x == (0.0, 1.0) and any(label.startswith("trivial baseline") for label in labels)
    assert any(label.startswith("constant predictor") for label in limits["train_loss.png"][2])
    assert limits["train_loss.png"][1][0] == 0.0


def test_axis_of_a_two_of_64_difference_is_not_a_cliff():
    from qlora_cls.plots import _limits
    lo, hi = _limits([0.578, 0.609, 0.672], "accuracy")  # the two adapters and their baseline
    assert lo <= 0.578 and hi >= 0.672 and hi - lo >= 0.3 and 0 <= lo and hi <= 1
    assert (0.609 - 0.578) / (hi - lo) < 0.12  # a 2-of-64 step is a small part of the axis
    assert _limits([0.98, 0.99], "accuracy") == pytest.approx((0.7, 1.0))


def test_report_warns_only_for_the_configuration_below_its_baseline(tmp_path):
    def fake(path, prompt, acc, base_acc=0.672):
        path.mkdir(parents=True)
        baseline = {"kind": "majority_class", "prediction": 1, "prediction_name": "equivalent", "eval_examples": 64,
                    "description": "always predicts 'equivalent'", "train_loss": 0.63,
                    "metrics": {"accuracy": base_acc, "f1": 0.804}}
        cfg = {"prompt": prompt, "seed": 1, "max_steps": 8, "results_path": str(path), "model_dir": None}
        res = {"metrics": ["accuracy", "f1"], "main_metric": "accuracy", "eval_split": "validation",
               "eval_examples": 64, "task": "mrpc", "prompt_name": prompt, "baseline": baseline}
        (path / "config.json").write_text(json.dumps({"config": cfg, "resolved": res, "environment": {"world_size": 1}}))
        (path / "metrics.json").write_text(json.dumps({
            "run": {"model": "m", "task": "mrpc", "prompt": prompt, "steps": 8, "epochs_trained": 0.0174,
                    "examples_seen": 64, "eval_split": "validation", "eval_examples": 64, "evaluations": 1},
            "eval_split": "validation", "best_epoch": 0, "best_step": 8, "baseline": baseline,
            "vs_baseline": {"metric": "accuracy", "model": acc, "baseline": base_acc, "beats": acc > base_acc,
                            "margin": acc - base_acc},
            "train_seconds": 1.0, "parameters": {"trainable": 1, "total": 2},
            "epochs": [{"epoch": 0, "step": 8, "accuracy": acc, "f1": 0.5}],
            "final": {"epoch": 0, "step": 8, "accuracy": acc, "f1": 0.5}}))
    fake(tmp_path / "a", "none", 0.578)
    fake(tmp_path / "b", "perfect", 0.703)
    out = report.main([str(tmp_path), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert len(out["below_baseline"]) == 1 and out["below_baseline"][0].startswith("prompt=none")
    assert "> **Warning:** prompt=none does not beat the trivial baseline" in md
    assert "prompt=perfect does not beat" not in md
    assert "| -0.0940 **below** |" in md and "| +0.0310 |" in md
    assert "– (1 evaluation)" in md  # no "best epoch 1" for a run evaluated once


@pytest.mark.slow
def test_demo_prints_before_after_and_baseline(tiny_model, mrpc, tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo", Path(__file__).resolve().parent.parent / "scripts/demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = demo.main(["--dataset", mrpc, "--model_dir", tiny_model, "--steps", "2", "--sweep_steps", "0",
                     "--eval_samples", "16", "--results_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    table = printed[printed.rindex("Demo result:"):]
    before = json.loads((out["run"] / "evals/test-perfect-base/metrics.json").read_text())
    after = json.loads((out["run"] / "evals/test-perfect/metrics.json").read_text())
    for label, value in (("un-tuned base model (before)", before["metrics"]["accuracy"]),
                         ("fine-tuned adapter (after)", after["metrics"]["accuracy"]),
                         ("trivial baseline (always", after["baseline"]["metrics"]["accuracy"])):
        line = [ln for ln in table.splitlines() if label in ln][-1]
        assert f"{value:.3f}" in line, (label, line)
    assert "test (16 examples)" in table and "validation (16 examples)" in table
    assert ("beats the trivial baseline" in table) or ("does NOT beat the trivial baseline" in table)
    assert f"--logdir {tmp_path}" in printed
