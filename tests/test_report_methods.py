"""report.py's method comparison and its curves against optimizer step, on run folders built by hand
with the fields of notes/fields.md (and older folders without them); every expected number is worked
out here from the values written, not from the code under test."""
import csv
import json
import math

import pytest

import report

MiB = 2**20
BASELINE = {"kind": "majority_class", "prediction": 1, "prediction_name": "equivalent", "eval_examples": 50,
            "description": "always 'equivalent' (majority of the training labels)", "train_loss": 0.63,
            "metrics": {"accuracy": 0.6, "f1": 0.75}}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _manifest(folder, swept):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps({"grid": {"swept": swept, "fixed": []}, "points": {}}))


def _run(path, seed, accuracy, *, new=True, evaluations=None, epochs=None, trainable=1000, total=100000,
         adapter_files=None, metrics_extra=None, **config):
    """A finished run folder. ``new``: with the fields being added this session (method, eval_every,
    adapter_bytes, latency, ...); else as ft.py wrote them before (no such keys)."""
    path.mkdir(parents=True)
    cfg = {"prompt": "none", "seed": seed, "lr": 3e-4, "r": 8, "max_steps": 10, "load_in_4bit": True,
           "results_path": str(path), "log_every": 5, "model_dir": None, "tokenizer_dir": None}
    if new:
        cfg.update(method="qlora", eval_every=0, param_budget=None, adapter_bottleneck=64, adapter_layernorm=False)
    cfg.update(config)
    resolved = {"metrics": ["accuracy", "f1"], "main_metric": "accuracy", "eval_split": "validation",
                "steps_per_epoch": 5, "eval_examples": 50, "parameters": {"trainable": trainable, "total": total},
                "baseline": BASELINE}
    (path / "config.json").write_text(json.dumps({"config": cfg, "resolved": resolved,
                                                  "environment": {"world_size": 1}}))
    epochs = epochs or [{"epoch": 0, "step": 5, "split": "validation", "accuracy": accuracy - 0.1},
                        {"epoch": 1, "step": 10, "split": "validation", "accuracy": accuracy}]
    m = {"eval_split": "validation", "best_epoch": 1, "best_step": 10, "train_seconds": 20.0,
         "peak_memory_bytes": 100 * MiB, "parameters": {"trainable": trainable, "total": total},
         "baseline": BASELINE, "vs_baseline": {"metric": "accuracy", "model": accuracy, "baseline": 0.6,
                                               "beats": accuracy > 0.6},
         "epochs": epochs, "final": {**epochs[-1], "accuracy": accuracy, "f1": accuracy}}
    if evaluations is not None:
        m["evaluations"] = evaluations
    m.update(metrics_extra or {})
    (path / "metrics.json").write_text(json.dumps(m))
    for name, size in (adapter_files or {}).items():
        (path / "adapter").mkdir(exist_ok=True)
        (path / "adapter" / name).write_bytes(b"x" * size)
    return path


def _new_fields(seconds_per_epoch, tokens_per_s, peak, lat1, lat8, adapter_bytes):
    return {"train_seconds_per_epoch": seconds_per_epoch, "train_tokens_per_s": tokens_per_s, "epochs_trained": 2.0,
            "peak_memory_bytes": peak, "adapter_bytes": adapter_bytes,
            "latency": {"batch_1": {"median_ms": lat1, "p95_ms": lat1 + 1, "calls": 20},
                        "batch_8": {"median_ms": lat8, "p95_ms": lat8 + 2, "calls": 20}}}


def _sample_std(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def test_method_table_numbers_over_three_seeds(tmp_path):
    s = tmp_path / "methods"
    _manifest(s, {"method": [["qlora"], ["lora"], ["full"]], "seed": [["1"], ["2"], ["3"]]})
    acc = {"qlora": (0.70, 0.74, 0.78), "lora": (0.60, 0.65, 0.80), "full": (0.50, 0.55, 0.57)}
    sizes = {"qlora": 3 * MiB, "lora": 3 * MiB, "full": 540 * MiB}
    params = {"qlora": (1_000_000, 135_000_000), "lora": (1_000_000, 135_000_000), "full": (135_000_000, 135_000_000)}
    for method in ("full", "lora", "qlora"):  # written out of order: the table orders methods itself
        for i, seed in enumerate((1, 2, 3)):
            extra = _new_fields(10.0 + 2 * i, 1000.0 + 100 * i, (200 + i) * MiB, 5.0 + i, 20.0 + 2 * i, sizes[method])
            if method == "full" and seed == 3:
                del extra["latency"]  # one run without latency: the mean is over the other two
            _run(s / f"method={method},seed={seed}", seed, acc[method][i], method=method,
                 load_in_4bit=method == "qlora",  # as --load_in_4bit auto resolves it per method
                 trainable=params[method][0], total=params[method][1], metrics_extra=extra)
    result = report.main([str(s)])
    out = result["out"]
    # load_in_4bit follows the swept method: no "runs differ" warning, no flagged rows
    assert "runs differ in load_in_4bit" not in (out / "report.md").read_text()
    rows = _rows(out / "methods.csv")
    assert [r["method"] for r in rows] == ["qlora", "lora", "full", "trivial baseline: always 'equivalent'"]
    by = {r["method"]: r for r in rows}
    for method in ("qlora", "lora", "full"):
        r = by[method]
        a = acc[method]
        assert r["n_runs"] == "3" and r["seeds"] == "1;2;3"
        assert float(r["accuracy_mean"]) == pytest.approx(sum(a) / 3, abs=1e-12)
        assert float(r["accuracy_std"]) == pytest.approx(_sample_std(a), abs=1e-12)
        assert float(r["trainable_pct"]) == pytest.approx(100 * params[method][0] / params[method][1])
        assert float(r["adapter_mib"]) == pytest.approx(sizes[method] / MiB) and r["adapter_bytes_source"] == "recorded"
        assert float(r["train_seconds_per_epoch_mean"]) == pytest.approx(12.0)        # 10, 12, 14
        assert float(r["train_tokens_per_s_mean"]) == pytest.approx(1100.0)            # 1000, 1100, 1200
        assert float(r["peak_memory_mib_max"]) == pytest.approx(202.0)                 # max of 200, 201, 202 MiB
        assert float(r["latency_b1_p95_ms"]) == pytest.approx(7.0 if method != "full" else 6.5)
    assert float(by["qlora"]["latency_b1_median_ms"]) == pytest.approx(6.0)            # 5, 6, 7
    assert float(by["full"]["latency_b1_median_ms"]) == pytest.approx(5.5)             # 5, 6 (third has none)
    assert float(by["full"]["latency_b8_median_ms"]) == pytest.approx(21.0)            # 20, 22
    assert float(by["full"]["trainable_pct"]) == pytest.approx(100.0)
    assert by["full"]["beats_baseline"] == "False" and by["qlora"]["beats_baseline"] == "True"  # 0.54 < 0.6 < 0.74
    base = by["trivial baseline: always 'equivalent'"]
    assert float(base["accuracy_mean"]) == 0.6 and base["trainable_params"] == "0" and base["adapter_bytes"] == "0"

    md = (out / "report.md").read_text()
    section = md.split("## Method comparison")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {c[0]: dict(zip(header, c)) for c in
             ([x.strip() for x in line.strip("|").split("|")] for line in table[1:])}
    assert header[:4] == ["method", "n", "trainable params", "% of model"]  # no other field swept: no settings column
    q = cells["qlora"]
    assert q["trainable params"] == "1,000,000" and q["% of model"] == "0.741 %"  # 1e6 / 135e6 = 0.7407 %
    assert q["adapter on disk (MiB)"] == "3.00" and cells["full"]["adapter on disk (MiB)"] == "540"
    assert q["train time per epoch (s)"] == "12.0" and q["train tokens/s"] == "1,100"
    assert q["peak memory (MiB)"] == "202"
    assert q["accuracy (mean ± std)"] == "0.7400 ± 0.0400"
    lora = (0.6, 0.65, 0.8)
    assert cells["lora"]["accuracy (mean ± std)"] == f"{sum(lora) / 3:.4f} ± {_sample_std(lora):.4f}"
    assert "below baseline" in cells["full"]["accuracy (mean ± std)"]
    assert q["latency batch 1 (ms)"] == "6.0" and q["latency batch 8 (ms)"] == "22.0"
    assert cells["full"]["latency batch 1 (ms)"] == "5.5 (2 of 3 runs)"
    assert cells["trivial baseline: always 'equivalent'"]["accuracy (mean ± std)"] == "0.6000"
    assert "over the runs that record it: full" in section


def test_methods_with_other_swept_fields_get_a_row_per_combination(tmp_path):
    s = tmp_path / "grid"
    _manifest(s, {"method": [["qlora"], ["full"]], "lr": [["1e-4"], ["3e-4"]], "seed": [["1"], ["2"]]})
    expected = {}
    for method in ("qlora", "full"):
        for lr, bump in ((1e-4, 0.0), (3e-4, 0.1)):
            values = []
            for seed in (1, 2):
                a = 0.6 + bump + 0.02 * seed + (0.05 if method == "full" else 0.0)
                values.append(a)
                _run(s / f"method={method},lr={lr},seed={seed}", seed, a, method=method, lr=lr)
            expected[(method, lr)] = sum(values) / 2
    rows = report.main([str(s)])["method_rows"]
    assert [(r["method"], r["settings"]["lr"]) for r in rows] == [("qlora", 1e-4), ("qlora", 3e-4),
                                                                 ("full", 1e-4), ("full", 3e-4)]
    for r in rows:
        assert r["n_runs"] == 2 and r["accuracy_mean"] == pytest.approx(expected[(r["method"], r["settings"]["lr"])])
    md = (s / "report" / "report.md").read_text()
    assert "| method | other settings | n |" in md and "| full | lr=0.0003 | 2 |" in md
    assert "one row per method and setting of the other swept field(s) (lr)" in md
    csv_rows = _rows(s / "report" / "methods.csv")
    assert [r["lr"] for r in csv_rows[:4]] == ["0.0001", "0.0003", "0.0001", "0.0003"]


def test_older_runs_are_read_as_qlora_or_lora_and_missing_fields_show_a_dash(tmp_path):
    root = tmp_path / "results"
    # written before this session: no method, no new metrics; adapter/ files of known sizes (README excluded)
    _run(root / "old-qlora", 1, 0.70, new=False, adapter_files={"adapter_model.safetensors": 2_000_000,
                                                                 "adapter_config.json": 1_000, "README.md": 5_000})
    # a new QLoRA run with the same settings: the same configuration (legacy fields read as their defaults)
    _run(root / "new-qlora", 2, 0.80, metrics_extra=_new_fields(9.0, 1500.0, 120 * MiB, 4.0, 16.0, 2_500_000))
    _run(root / "old-lora", 1, 0.65, new=False, load_in_4bit=False)  # no adapter/ left on disk
    result = report.main([str(root)])
    by = {r["method"]: r for r in result["method_rows"]}
    assert set(by) == {"qlora", "lora"}
    q, lo = by["qlora"], by["lora"]
    assert q["n_runs"] == 2 and sorted(q["runs"]) == ["new-qlora", "old-qlora"] and not q["differs"]
    assert q["accuracy_mean"] == pytest.approx(0.75)
    assert q["adapter_bytes_mean"] == pytest.approx((2_001_000 + 2_500_000) / 2)
    assert q["adapter_bytes_source"] == "measured/recorded"
    # old run: train_seconds 20 over 10 steps / 5 per epoch = 2 epochs -> 10 s; new run records 9 s
    assert q["train_seconds_per_epoch_mean"] == pytest.approx(9.5)
    assert q["train_tokens_per_s_mean"] == pytest.approx(1500.0) and q["train_tokens_per_s_n"] == 1
    assert lo["adapter_bytes_mean"] is None and lo["latency_b1_ms_mean"] is None
    assert lo["train_seconds_per_epoch_mean"] == pytest.approx(10.0)
    md = (root / "report" / "report.md").read_text()
    lora_line = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert lora_line.count("– ¹") == 4  # adapter size, tokens/s, both latencies
    assert "'adapter on disk (MiB)' not recorded: metrics.json has no adapter_bytes and the run has no adapter/ " \
           "folder (older ft.py): lora" in md
    assert "'train tokens/s' over the runs that record it: qlora" in md
    qlora_line = next(line for line in md.splitlines() if line.startswith("| qlora |"))
    assert f"| {(2_001_000 + 2_500_000) / 2 / MiB:.2f} |" in qlora_line
    assert "1,500 (1 of 2 runs)" in qlora_line
    assert float(_rows(root / "report" / "methods.csv")[0]["adapter_bytes"]) == (2_001_000 + 2_500_000) / 2


def test_a_single_method_has_no_method_table(tmp_path):
    _run(tmp_path / "a", 1, 0.7)
    _run(tmp_path / "b", 1, 0.8, lr=1e-4)
    out = report.main([str(tmp_path)])
    assert out["method_rows"] == [] and not (out["out"] / "methods.csv").exists()
    assert "## Method comparison" not in (out["out"] / "report.md").read_text()


def _step_evals(values, every=2):
    """Step-wise evaluations at every, 2*every, ... and the epoch-end one at the last step (same score)."""
    out = [{"epoch": (i * every) // 5, "step": (i + 1) * every, "split": "validation", "trigger": "step",
            "accuracy": v, "eval_examples_per_s": 100.0, "eval_seconds": 0.5} for i, v in enumerate(values)]
    return out + [{**out[-1], "trigger": "epoch"}]


def test_step_curves_one_line_per_value_mean_over_seeds(tmp_path, monkeypatch):
    from qlora_cls import plots
    drawn = {}
    save = plots._save

    def capture(fig, path):
        ax = fig.axes[0]
        drawn[path.name] = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                            for line in ax.get_lines()]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    root = tmp_path / "budget"
    # sweep 1 varies r over 3 seeds; sweep 2 varies lr (r fixed at 8): the r figure must not average lr's runs in
    _manifest(root / "r", {"r": [["4"], ["8"]], "seed": [["1"], ["2"], ["3"]]})
    curves = {4: [(0.5, 0.6, 0.7), (0.52, 0.62, 0.66), (0.54, 0.58, 0.74)],
              8: [(0.6, 0.7, 0.8), (0.6, 0.72, 0.78), (0.63, 0.71, 0.79)]}
    for r_value, per_seed in curves.items():
        for seed, values in zip((1, 2, 3), per_seed):
            _run(root / "r" / f"r={r_value},seed={seed}", seed, values[-1], r=r_value, eval_every=2,
                 evaluations=_step_evals(values))
    _manifest(root / "lr", {"lr": [["3e-4"], ["1e-3"]], "seed": [["1"]]})
    _run(root / "lr" / "lr=3e-4,seed=1", 1, 0.9, lr=3e-4, eval_every=2, evaluations=_step_evals((0.1, 0.2, 0.9)))
    # an older run of the same sweep has only epoch-end evaluations: its curve comes from `epochs`; it was
    # evaluated differently (no --eval_every), a field not swept, so it stands apart, flagged
    _run(root / "lr" / "lr=1e-3,seed=1", 1, 0.4, new=False, lr=1e-3,
         epochs=[{"epoch": 0, "step": 5, "accuracy": 0.3}, {"epoch": 1, "step": 10, "accuracy": 0.4}])
    result = report.main([str(root)])
    out = result["out"]
    assert (out / "eval_vs_step_r.png").is_file() and (out / "eval_vs_step_lr.png").is_file()
    lines = drawn["eval_vs_step_r.png"]
    data = [entry for entry in lines if not entry[0].startswith("trivial baseline")]
    assert [label for label, *_ in data] == ["r=4 (3 runs)", "r=8 (3 runs)"]
    for (label, xs, ys), r_value in zip(data, (4, 8)):
        assert xs == [2, 4, 6]
        for i in range(3):
            assert ys[i] == pytest.approx(sum(v[i] for v in curves[r_value]) / 3)
    assert [label for label, *_ in lines if label.startswith("trivial baseline")] == \
        ["trivial baseline: always 'equivalent' (0.600)"]
    lr_lines = [entry for entry in drawn["eval_vs_step_lr.png"] if not entry[0].startswith("trivial")]
    assert [(label, xs, ys) for label, xs, ys in lr_lines] == [("lr=0.0003 (1 run)", [2, 4, 6], [0.1, 0.2, 0.9]),
                                                              ("lr=0.001 [eval_every=0] (1 run)", [5, 10], [0.3, 0.4])]
    table = _rows(out / "eval_vs_step.csv")
    r8 = [t for t in table if t["field"] == "r" and t["value"] == "8"]
    assert [int(t["step"]) for t in r8] == [2, 4, 6] and all(t["n_runs"] == "3" for t in r8)
    assert float(r8[1]["accuracy_std"]) == pytest.approx(_sample_std((0.7, 0.72, 0.71)))
    assert float(r8[1]["accuracy_min"]) == 0.7 and float(r8[1]["accuracy_max"]) == 0.72
    assert {t["value"] for t in table if t["field"] == "lr"} == {"0.0003", "0.001"}
    md = (out / "report.md").read_text()
    assert "](eval_vs_step_r.png)" in md and "](eval_vs_step_lr.png)" in md
    assert "every 2 optimizer steps (--eval_every)" in md
    # a re-run without step-wise evaluations removes the figures it no longer has data for
    for run in (root / "r").glob("r=*"):
        (run / "metrics.json").unlink()
    (root / "lr" / "lr=3e-4,seed=1" / "metrics.json").unlink()
    report.main([str(root)])
    assert not list(out.glob("eval_vs_step*"))
    assert "No step-wise evaluations" in (out / "report.md").read_text()


def test_step_curves_average_the_other_fields_of_a_grid_and_say_so(tmp_path):
    from qlora_cls.report import collect, step_curves
    s = tmp_path / "grid"
    _manifest(s, {"r": [["4"], ["8"]], "lr": [["1e-4"], ["3e-4"]], "seed": [["1"]]})
    scores = {(4, 1e-4): 0.5, (4, 3e-4): 0.7, (8, 1e-4): 0.6, (8, 3e-4): 0.9}
    for (r_value, lr), v in scores.items():
        _run(s / f"r={r_value},lr={lr},seed=1", 1, v, r=r_value, lr=lr, eval_every=5,
             evaluations=_step_evals((v - 0.1, v), every=5))
    curves = step_curves(collect(s), "accuracy")
    assert set(curves) == {"r", "lr"}
    r4 = curves["r"][0]
    assert r4["value"] == 4 and r4["n_series"] == 2 and r4["averaged_over"] == {"lr": [1e-4, 3e-4]}
    assert r4["mean"] == pytest.approx([(0.4 + 0.6) / 2, (0.5 + 0.7) / 2])
    assert curves["lr"][1]["mean"][-1] == pytest.approx((0.7 + 0.9) / 2)


@pytest.mark.slow
def test_todays_run_folders_report_without_the_new_fields(tiny_sweep, tmp_path):
    """The real tiny sweep (one method, no step-wise evaluations) reports without the new sections; with its
    folders stripped back to what ft.py wrote before --method (no method, evaluations, latency, ...) and two
    runs re-read as 16-bit LoRA (what an older LoRA run's config.json looks like) the method table measures
    the real adapter files and shows the absent fields as '–'."""
    import shutil
    d = tmp_path / "prompts"
    shutil.copytree(tiny_sweep["dir"], d, ignore=shutil.ignore_patterns("report"))
    out = report.main([str(d)])
    assert out["method_rows"] == [] and out["step_curves"] == {}
    assert not (d / "report" / "methods.csv").exists() and not list((d / "report").glob("eval_vs_step*"))
    md = (d / "report" / "report.md").read_text()
    assert "No step-wise evaluations" in md and "## Method comparison" not in md

    for run in d.glob("prompt=*"):
        cfg_path, metrics_path = run / "config.json", run / "metrics.json"
        records, metrics = json.loads(cfg_path.read_text()), json.loads(metrics_path.read_text())
        for key in ("method", "adapter_bottleneck", "adapter_layernorm", "param_budget", "eval_every", "latency_calls"):
            records["config"].pop(key, None)
        for key in ("evaluations", "train_tokens", "train_tokens_per_s", "train_seconds_per_epoch", "epochs_trained",
                    "adapter_bytes", "latency"):
            metrics.pop(key, None)
        if run.name.startswith("prompt=perfect"):
            records["config"]["load_in_4bit"] = False
        cfg_path.write_text(json.dumps(records))
        metrics_path.write_text(json.dumps(metrics))
    out = report.main([str(d)])
    rows = {r["method"]: r for r in out["method_rows"]}
    assert list(rows) == ["qlora", "lora"]
    for method, prompt in (("qlora", "none"), ("lora", "perfect")):
        r = rows[method]
        runs = [d / f"prompt={prompt},seed={s}" for s in (1, 2)]
        finals = [json.loads((run / "metrics.json").read_text()) for run in runs]
        sizes = [sum((run / "adapter" / n).stat().st_size for n in ("adapter_model.safetensors", "adapter_config.json"))
                 for run in runs]
        assert sorted(p.name for p in (runs[0] / "adapter").iterdir()) == \
            ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert r["adapter_bytes_mean"] == pytest.approx(sum(sizes) / 2) and r["adapter_bytes_source"] == "measured"
        per_epoch = [f["train_seconds"] / (f["run"]["steps"] / f["run"]["steps_per_epoch"]) for f in finals]
        assert r["train_seconds_per_epoch_mean"] == pytest.approx(sum(per_epoch) / 2)
        assert r["trainable_pct"] == pytest.approx(100 * finals[0]["parameters"]["trainable"]
                                                   / finals[0]["parameters"]["total"])
        assert r["accuracy_mean"] == pytest.approx(sum(f["final"]["accuracy"] for f in finals) / 2)
        assert r["train_tokens_per_s_mean"] is None and r["latency_b1_ms_mean"] is None
    md = (d / "report" / "report.md").read_text()
    assert "## Method comparison" in md and "metrics.json has no train_tokens_per_s (older ft.py)" in md
    assert "trivial baseline: always 'equivalent'" in md.split("## Method comparison")[1]
