"""report.py: table values against the runs' own metrics, valid PNGs, grouping flags, bad input."""
import csv
import json
import statistics

import pytest

import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_report_of_the_tiny_sweep_matches_the_runs(tiny_sweep, tmp_path):
    d = tiny_sweep["dir"]
    out = report.main([str(d)])["out"]
    assert out == d / "report"
    rows = {r["configuration"]: r for r in _rows(out / "report.csv")}
    for prompt in ("none", "perfect"):
        row = rows[f"prompt={prompt}"]
        finals = [json.loads((d / f"prompt={prompt},seed={s}" / "metrics.json").read_text()) for s in (1, 2)]
        assert row["n_runs"] == "2" and row["seeds"] == "1;2" and row["differs_in"] == ""
        for m in ("accuracy", "f1"):
            values = [f["final"][m] for f in finals]
            assert float(row[f"{m}_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert float(row[f"{m}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert int(row["trainable_params"]) == finals[0]["parameters"]["trainable"]
        assert float(row["train_seconds_mean"]) == pytest.approx(statistics.fmean(f["train_seconds"] for f in finals))
        assert float(row["peak_memory_mib_max"]) == pytest.approx(max(f["peak_memory_bytes"] for f in finals) / 2**20)
        assert row["best_epoch"] == ";".join(str(f["best_epoch"] + 1) for f in finals)
        assert float(row["tokens_per_s_mean"]) > 0
    base = rows["base model (un-tuned), prompt=none"]
    expected = json.loads((d / "base/validation-none-base/metrics.json").read_text())["metrics"]["accuracy"]
    assert float(base["accuracy_mean"]) == pytest.approx(expected)
    evals = _rows(out / "evals.csv")
    cross = [e for e in evals if e["configuration"] == "prompt=perfect" and e["eval_prompt"] == "none"]
    values = [json.loads((d / f"prompt=perfect,seed={s}/evals/validation-none/metrics.json").read_text())
              ["metrics"]["f1"] for s in (1, 2)]
    assert len(cross) == 1 and float(cross[0]["f1_mean"]) == pytest.approx(statistics.fmean(values))
    md = (out / "report.md").read_text()
    assert "| prompt=none | 2 |" in md and "base model (un-tuned), prompt=perfect" in md
    from PIL import Image
    for name in ("eval_per_epoch.png", "train_loss.png", "final_metric.png", "prompt_matrix.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(out / name) as img:
            img.verify()
            assert img.size[0] > 400 and img.size[1] > 200
        assert f"]({name})" in md
    # regenerating replaces the report's own files; a folder holding anything else is refused
    report.main([str(d)])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        report.main([str(d)])
    assert (out / "notes.txt").read_text() == "mine"


def _fake_run(path, seed, accuracy, **config):
    """A finished run folder as ft.py leaves it (just the files report.py reads)."""
    path.mkdir(parents=True)
    cfg = {"prompt": "none", "seed": seed, "lr": 3e-4, "r": 8, "max_steps": 10, "results_path": str(path),
           "log_every": 10, "model_dir": None, "tokenizer_dir": None, **config}
    (path / "config.json").write_text(json.dumps({
        "config": cfg, "resolved": {"metrics": ["accuracy", "f1"], "main_metric": "accuracy", "eval_split": "validation"},
        "environment": {"world_size": 1}}))
    (path / "metrics.json").write_text(json.dumps({
        "eval_split": "validation", "best_epoch": 0, "train_seconds": 10.0, "peak_memory_bytes": 2**20,
        "parameters": {"trainable": 100, "total": 1000},
        "epochs": [{"epoch": 0, "step": 10, "accuracy": accuracy, "f1": accuracy / 2}],
        "final": {"epoch": 0, "step": 10, "accuracy": accuracy, "f1": accuracy / 2}}))
    (path / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "tokens_per_s": 50.0,
                                                              "examples_per_s": 2.0}) + "\n" for s in (5, 10)))


def test_grouping_flags_a_run_differing_in_a_field_not_swept(tmp_path):
    from qlora_cls.report import collect, label
    s = tmp_path / "sweep"
    s.mkdir()
    (s / "sweep.json").write_text(json.dumps({"grid": {"swept": {"prompt": [["none"], ["perfect"]],
                                                                 "seed": [["1"], ["2"]]}, "fixed": []},
                                              "points": {}}))
    _fake_run(s / "prompt=none,seed=1", 1, 0.6)
    _fake_run(s / "prompt=none,seed=2", 2, 0.8, log_every=1)          # bookkeeping only: same group
    _fake_run(s / "prompt=perfect,seed=1", 1, 0.7, prompt="perfect")
    _fake_run(s / "prompt=perfect,seed=2", 2, 0.9, prompt="perfect", max_steps=20)  # NOT comparable
    col = collect(s)
    labels = [label(g, col.swept) for g in col.groups]
    assert labels == ["prompt=none", "prompt=perfect", "prompt=perfect [max_steps=20]"]
    assert [len(g.runs) for g in col.groups] == [2, 1, 1]
    assert col.swept == ["prompt"] and len(col.warnings) == 1 and "max_steps" in col.warnings[0]
    result = report.main([str(s), "--out", str(tmp_path / "rep")])
    rows = {r["configuration"]: r for r in _rows(tmp_path / "rep/report.csv")}
    assert rows["prompt=none"]["accuracy_mean"] == "0.7" and rows["prompt=none"]["n_runs"] == "2"
    assert rows["prompt=perfect [max_steps=20]"]["differs_in"] == "max_steps=20"
    assert rows["prompt=perfect"]["accuracy_std"] == ""  # one run: no std
    md = (tmp_path / "rep/report.md").read_text()
    assert "**Warning:** runs differ in max_steps" in md and "differs in" in md
    assert result["warnings"]


def test_without_a_manifest_the_varying_fields_are_the_columns(tmp_path):
    from qlora_cls.report import collect
    _fake_run(tmp_path / "a", 1, 0.5)
    _fake_run(tmp_path / "b", 1, 0.6, lr=1e-4)
    _fake_run(tmp_path / "c", 2, 0.6, lr=1e-4)
    (tmp_path / "c" / "metrics.json").unlink()  # unfinished
    col = collect(tmp_path)
    assert col.swept_inferred and col.swept == ["lr"] and not col.warnings
    out = report.main([str(tmp_path)])
    md = (out["out"] / "report.md").read_text()
    assert "c: unfinished" in md


def test_bad_input_is_one_line(tmp_path, capsys):
    for argv, text in (([str(tmp_path)], "holds no run folders"), ([str(tmp_path / "nope")], "no such folder")):
        with pytest.raises(SystemExit) as exc:
            report.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("report.py: error:") and text in err[0]
