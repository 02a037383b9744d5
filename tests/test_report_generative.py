"""report.py on generative runs (ft.py --objective sft | lm): the generative metrics beside the base model's (the
baseline of such a run), 'vs baseline' on the main metric (lower is better), the plots on the main metric.

Oracle: each run's own metrics.json (final figures, the base model's figures before the first step)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import report
from generative_runs import finished_run


def test_lower_is_better_knows_every_generative_main_metric():
    from qlora_cls.generative import MAIN_METRIC
    from qlora_cls.report import LOWER_IS_BETTER
    assert set(MAIN_METRIC.values()) <= LOWER_IS_BETTER


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """Two finished sft runs (different chat templates, so different base-model figures) under one folder,
    without their weights (the report reads none)."""
    root = tmp_path_factory.mktemp("report-generative")
    for name in ("lora-utterances", "qlora"):
        shutil.copytree(finished_run(tmp_path_factory, name), root / name,
                        ignore=shutil.ignore_patterns("adapter", "adapter_best", "evals", "checkpoints"))
    return root


def test_report_shows_the_generative_metrics_beside_the_base_models(runs_root, tmp_path, monkeypatch):
    from qlora_cls import plots
    drawn, save = {}, plots._save

    def capture(fig, p):
        ax = fig.axes[0]
        drawn[Path(p).name] = (ax.get_ylim(), [(ln.get_label(), list(ln.get_ydata())) for ln in ax.get_lines()],
                               ax.get_ylabel())
        return save(fig, p)
    monkeypatch.setattr(plots, "_save", capture)
    out = report.main([str(runs_root), "--out", str(tmp_path / "rep")])
    with open(tmp_path / "rep" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    md = (tmp_path / "rep" / "report.md").read_text()
    metrics = {name: json.loads((runs_root / name / "metrics.json").read_text()) for name in ("lora-utterances", "qlora")}
    by_run = {r["runs"]: r for r in rows if r["n_runs"] == "1"}
    assert set(by_run) == set(metrics)
    names = ("answer_perplexity", "answer_loss", "stop_rate", "exact_match", "rouge_l")
    for name, m in metrics.items():
        row, final, base = by_run[name], m["final"], m["baseline"]["metrics"]
        for k in names:
            assert float(row[f"{k}_mean"]) == pytest.approx(final[k]) and float(row[f"baseline_{k}"]) == pytest.approx(base[k])
        assert row["beats_baseline"] == str(final["answer_perplexity"] < base["answer_perplexity"])
        margin = base["answer_perplexity"] - final["answer_perplexity"]  # lower is better: positive = better
        assert f"| {margin:+.4f} |" in md
    # the base model's rows: one per distinct set of figures (the two chat templates render different prompts)
    base_rows = [r for r in rows if r["configuration"] == "the base model (un-tuned)"]
    assert sorted(float(r["answer_perplexity_mean"]) for r in base_rows) == \
        sorted(m["baseline"]["metrics"]["answer_perplexity"] for m in metrics.values())
    assert {r["eval_examples"] for r in base_rows} == {str(m["run"]["eval_examples"]) for m in metrics.values()}
    assert "**Baseline: the base model, un-tuned**" in md and "| trivial baseline" not in md
    assert "classifier" not in md and "the base model (un-tuned), validation, 8 examples" in md
    assert out["below_baseline"] == [w for w in out["below_baseline"] if "does not improve on the base model" in w]

    # the figures plot the main metric (generative.MAIN_METRIC), each run's evaluations and the base model's line
    (lo, hi), lines, ylabel = drawn["eval_per_epoch.png"]
    assert ylabel == "answer_perplexity"
    for m in metrics.values():
        base = m["baseline"]["metrics"]["answer_perplexity"]
        assert [base] * 2 == next(v for k, v in lines if k.startswith("the base model (un-tuned)")
                                  and f"({base:.3f})" in k)
        assert lo < base < hi and lo < m["final"]["answer_perplexity"] < hi  # inside the frame, not on it
    plotted = sorted(v[0] for k, v in lines if not k.startswith("the base model"))
    assert plotted == pytest.approx(sorted(m["final"]["answer_perplexity"] for m in metrics.values()))
    assert "final_metric.png" in drawn and (tmp_path / "rep" / "eval_per_epoch.png").stat().st_size > 0


def test_report_of_an_lm_run_uses_perplexity(tmp_path_factory, tmp_path):
    run = finished_run(tmp_path_factory, "lm")
    m = json.loads((run / "metrics.json").read_text())
    out = report.main([str(run), "--out", str(tmp_path / "rep")])
    row = next(r for r in out["rows"])
    assert row["vs_baseline_metric"] == "perplexity"
    assert row["vs_baseline_margin"] == pytest.approx(m["baseline"]["metrics"]["perplexity"] - m["final"]["perplexity"])
    assert out["baselines"][0]["perplexity_mean"] == pytest.approx(m["baseline"]["metrics"]["perplexity"])
    assert "![perplexity at each evaluation" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.slow
def test_a_generative_sweep_finishes_and_reports(tmp_path_factory, tmp_path):
    """sweep.py over --objective sft points with its default evaluation prompts (classification templates, which
    eval.py refuses for a generative run): the points are not re-evaluated under them (each run scored itself
    and the base model), the sweep exits 0, and the report has a row per swept value beside the base model's."""
    import sweep
    from generative_runs import MAX_NEW_TOKENS, model_dir
    root = model_dir(tmp_path_factory).parent
    d = tmp_path / "sweep"
    code = sweep.main(["--sweep_dir", str(d), "--launcher", "python", "--model_dir", str(root / "model"),
                       "--objective", "sft", "--method", "lora", "--train_file", str(root / "train.json"),
                       "--eval_holdout", "8", "--generate_examples", "4", "--max_new_tokens", str(MAX_NEW_TOKENS),
                       "--max_length", "128", "--max_steps", "2", "--batch_size", "4", "--eval_batch_size", "4",
                       "--bnb_4bit_compute_dtype", "float32", "--fast_eval", "false", "--lr", "3e-3", "1e-2"])
    manifest = json.loads((d / "sweep.json").read_text())
    assert code == 0 and not [p for p in manifest["points"].values() if p.get("eval_errors")]
    out = report.main([str(d)])
    assert [r["label"] for r in out["rows"]] == ["lr=0.003", "lr=0.01"] and not out["problems"]
    for r in out["rows"]:
        m = json.loads((d / r["runs"][0] / "metrics.json").read_text())
        assert r["answer_perplexity_mean"] == pytest.approx(m["final"]["answer_perplexity"])
        assert r["baseline_answer_perplexity"] == pytest.approx(m["baseline"]["metrics"]["answer_perplexity"])
    assert [b["name"] for b in out["baselines"]] == ["the base model (un-tuned)"]
