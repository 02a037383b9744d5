"""predict.py on files the toolkit has not seen, merged folders, several adapters on one base.

Oracles: the run's own predictions_validation.csv (written by ft.py), a plain transformers forward of a
hand-saved merged model, and separate single-run calls for the multi-adapter path.
"""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eval as eval_cli
import ft
import predict
from conftest import REPO, tiny_args

N = 37  # the runs' validation examples (tiny_args' --max_eval_samples)


def _read(path_or_text) -> list[dict]:
    text = path_or_text if isinstance(path_or_text, str) else Path(path_or_text).read_text()
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def runs(tiny_model, mrpc, tmp_path_factory):
    """Two 2-step runs on one tiny 4-bit base, with different seeds, prompts and so heads."""
    root = tmp_path_factory.mktemp("predict-runs")
    ft.main(tiny_args(tiny_model, mrpc, root / "a", "--max_steps", "2"))
    ft.main(tiny_args(tiny_model, mrpc, root / "b", "--max_steps", "2", "--seed", "7", "--prompt", "none",
                      "--lr", "1e-2"))
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def rows(mrpc):
    """The runs' validation rows as a stranger would give them: no label, columns in another order."""
    import pandas as pd
    df = pd.read_parquet(Path(mrpc) / "mrpc" / "validation-00000-of-00001.parquet").head(N)
    return df[["sentence2", "idx", "sentence1"]].to_dict("records")


def _write_csv(path: Path, records, columns=None):
    columns = columns or list(records[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    return path


def _write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        predict.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("predict.py: error:")
    return err[-1]


def test_csv_and_jsonl_reproduce_the_runs_predictions(runs, rows, tmp_path):
    a, _ = runs
    oracle = _read(a / "predictions_validation.csv")
    names = json.loads((a / "config.json").read_text())["resolved"]["label_names"]
    for name, path in (("csv", _write_csv(tmp_path / "in.csv", rows)), ("jsonl", _write_jsonl(tmp_path / "in.jsonl", rows))):
        out = tmp_path / f"out-{name}.csv"
        summary = predict.main(["--results_path", str(a), "--input", str(path), "--output", str(out),
                                "--chunk_size", "64"])
        got = _read(out)
        assert summary["rows"] == summary["predicted"] == N and list(got[0]) == [
            "idx", "prediction", "prob_not_equivalent", "prob_equivalent"]
        # One chunk holding the run's rows: the very batches the run scored, so the same digits.
        assert [r["idx"] for r in got] == [r["idx"] for r in oracle]
        for g, o in zip(got, oracle):
            assert g["prediction"] == names[int(o["prediction"])]
            assert (g["prob_not_equivalent"], g["prob_equivalent"]) == (o["prob_not_equivalent"], o["prob_equivalent"])


def test_input_order_kept_across_chunks(runs, rows, tmp_path):
    """Chunks of 10 rows (4 chunks, each sorted by length inside): the output is still in input order."""
    a, _ = runs
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(N)]
    out = tmp_path / "out.csv"
    predict.main(["--results_path", str(a), "--input", str(_write_csv(tmp_path / "in.csv", shuffled)),
                  "--output", str(out), "--chunk_size", "10", "--batch_size", "4"])
    got = _read(out)
    oracle = {r["idx"]: r for r in _read(a / "predictions_validation.csv")}
    assert [r["idx"] for r in got] == [str(r["idx"]) for r in shuffled]
    for g in got:
        o = oracle[g["idx"]]
        p, q = float(g["prob_equivalent"]), float(o["prob_equivalent"])
        assert abs(p - q) < 2e-6  # other batches, other padding widths: float rounding only
        if abs(q - 0.5) > 1e-4:
            assert (g["prediction"] == "equivalent") == (q > 0.5)


def test_bad_rows_are_one_line_and_nothing_is_written(runs, rows, tmp_path, capsys):
    a, _ = runs
    bad = [dict(r) for r in rows[:6]]
    bad[2]["sentence1"] = "  "
    out = tmp_path / "out.csv"
    line = _error(["--results_path", str(a), "--input", str(_write_csv(tmp_path / "in.csv", bad)),
                   "--output", str(out)], capsys)
    assert "data row 3 has an empty sentence1" in line and "--skip_bad_rows" in line
    assert not out.exists() and not list(tmp_path.glob(".out.csv*"))
    line = _error(["--results_path", str(a), "--input", str(_write_csv(tmp_path / "nocol.csv", bad, ["idx", "sentence1"])),
                   "--output", str(out)], capsys)
    assert "lacks column(s) sentence2" in line and "found: idx, sentence1" in line
    missing = [dict(r) for r in rows[:4]]
    del missing[1]["sentence2"]
    line = _error(["--results_path", str(a), "--input", str(_write_jsonl(tmp_path / "in.jsonl", missing)),
                   "--output", str(out)], capsys)
    assert "line 2 lacks column(s) sentence2" in line
    assert not out.exists()


def test_skip_bad_rows_counts_them_and_keeps_one_row_per_input_row(runs, rows, tmp_path, caplog):
    a, _ = runs
    good = tmp_path / "good.csv"
    predict.main(["--results_path", str(a), "--input", str(_write_csv(tmp_path / "g.csv", rows[:8])),
                  "--output", str(good), "--chunk_size", "3"])
    bad = [dict(r) for r in rows[:8]]
    bad[1]["sentence2"] = ""
    bad[6]["sentence1"] = ""
    out = tmp_path / "out.csv"
    summary = predict.main(["--results_path", str(a), "--input", str(_write_csv(tmp_path / "b.csv", bad)),
                            "--output", str(out), "--chunk_size", "3", "--skip_bad_rows"])
    assert summary["skipped"] == 2 and summary["skipped_rows"] == [2, 7] and summary["predicted"] == 6
    assert any("skipped 2 bad row(s) of 8" in r.getMessage() for r in caplog.records)
    got, expected = _read(out), _read(good)
    assert [r["idx"] for r in got] == [str(r["idx"]) for r in rows[:8]]
    for i, (g, e) in enumerate(zip(got, expected)):
        if i in (1, 6):
            assert g["prediction"] == g["prob_equivalent"] == ""
        else:  # the other rows are predicted as without the bad ones (same chunks of 3 rows, less the bad)
            assert g["prediction"] == e["prediction"] and abs(float(g["prob_equivalent"]) - float(e["prob_equivalent"])) < 2e-6


def test_output_is_never_overwritten_without_overwrite(runs, rows, tmp_path, capsys):
    a, _ = runs
    inp = _write_csv(tmp_path / "in.csv", rows[:3])
    out = tmp_path / "out.csv"
    out.write_text("mine\n")
    assert "already exists" in _error(["--results_path", str(a), "--input", str(inp), "--output", str(out)], capsys)
    assert out.read_text() == "mine\n"
    assert "is the --input file" in _error(["--results_path", str(a), "--input", str(inp), "--output", str(inp),
                                            "--overwrite"], capsys)
    predict.main(["--results_path", str(a), "--input", str(inp), "--output", str(out), "--overwrite"])
    assert len(_read(out)) == 3
    # id column: --id_column names one; a named column the file lacks is one line
    predict.main(["--results_path", str(a), "--input", str(inp), "--output", str(tmp_path / "s.csv"),
                  "--id_column", "sentence2"])
    assert [r["sentence2"] for r in _read(tmp_path / "s.csv")] == [r["sentence2"] for r in rows[:3]]
    assert "no such column" in _error(["--results_path", str(a), "--input", str(inp), "--id_column", "key"], capsys)


@pytest.mark.slow
def test_stdin_to_stdout_pipeline(runs, rows, tmp_path):
    """`cat file | predict.py --input - | ...`: clean CSV on stdout (logs on stderr), same rows as a file run."""
    a, _ = runs
    inp = _write_jsonl(tmp_path / "in.jsonl", rows)
    expected = tmp_path / "expected.csv"
    predict.main(["--results_path", str(a), "--input", str(inp), "--output", str(expected), "--chunk_size", "16"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(inp, "rb") as stdin:
        proc = subprocess.run([sys.executable, str(REPO / "predict.py"), "--results_path", str(a), "--input", "-",
                               "--chunk_size", "16"], stdin=stdin, capture_output=True, cwd=tmp_path, env=env,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode() == expected.read_text()
    assert "predicted 37 row(s)" in proc.stderr.decode()
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence1,sentence2\nfine,also fine\n,empty first\n")
    with open(bad, "rb") as stdin:
        proc = subprocess.run([sys.executable, str(REPO / "predict.py"), "--results_path", str(a), "--input", "-"],
                              stdin=stdin, capture_output=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout == b""  # checked in full before anything is written
    assert proc.stderr.decode().strip().splitlines()[-1].startswith("predict.py: error: --input standard input: "
                                                                    "data row 2 has an empty sentence1")


# -- merged folders --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged(tiny_model, tmp_path_factory):
    """A merged folder in merge.py's layout, saved by hand from the tiny base with a seeded random head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    out = tmp_path_factory.mktemp("merged") / "mrpc-merged"
    names = ["not_equivalent", "equivalent"]
    torch.manual_seed(3)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=2, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        problem_type="single_label_classification", pad_token_id=tok.pad_token_id, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a head that separates the examples
    model.save_pretrained(out)
    tok.padding_side = "right"
    tok.save_pretrained(out)
    template = "Sentence 1: {sentence1} Sentence 2: {sentence2}"
    (out / "prompt.txt").write_text(template + "\n")
    (out / "qlora_cls.json").write_text(json.dumps({
        "format": "qlora-cls-merged/1", "source_run": "results/hand-made", "task": "mrpc", "label_names": names,
        "text_columns": ["sentence1", "sentence2"], "prompt_name": "hand", "max_length": 64, "num_labels": 2,
        "main_metric": "accuracy", "metrics": {}, "baseline": {}, "merged_into": "original-16bit",
        "base_model": tiny_model, "dtype": "float32"}))
    (out / "README.md").write_text("hand-made merged folder\n")
    return out, template, names


def _plain_forward(folder: Path, template: str, records) -> np.ndarray:
    """The oracle: plain transformers, one example at a time (no padding at all)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for r in records:
            enc = tok(template.format(**r), truncation=True, max_length=64, return_tensors="pt")
            out.append(torch.softmax(model(**enc).logits[0], -1).numpy())
    return np.array(out)


def test_merged_folder_predicts_as_plain_transformers(merged, rows, tmp_path):
    folder, template, names = merged
    oracle = _plain_forward(folder, template, rows)
    assert len(set(oracle.argmax(1))) == 2  # both classes occur: the label mapping is tested both ways
    out = tmp_path / "out.csv"
    predict.main(["--results_path", str(folder), "--input", str(_write_csv(tmp_path / "in.csv", rows)),
                  "--output", str(out), "--chunk_size", "8"])
    got = _read(out)
    assert [r["idx"] for r in got] == [str(r["idx"]) for r in rows]
    probs = np.array([[float(r["prob_not_equivalent"]), float(r["prob_equivalent"])] for r in got])
    assert np.abs(probs - oracle).max() < 1e-5
    assert [r["prediction"] for r in got] == [names[k] for k in oracle.argmax(1)]


@pytest.mark.slow
def test_merged_folder_needs_neither_peft_nor_bitsandbytes(merged, rows, tmp_path):
    """A merged folder is plain transformers: predicting with it imports neither library (a fresh process)."""
    folder, _, _ = merged
    inp = _write_csv(tmp_path / "in.csv", rows[:4])
    code = ("import sys, predict; predict.main(sys.argv[1:]); "
            "print('imported:', sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, "--results_path", str(folder), "--input", str(inp),
                           "--output", str(tmp_path / "out.csv")], capture_output=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip().splitlines()[-1] == "imported: []"
    assert len(_read(tmp_path / "out.csv")) == 4


def test_eval_on_a_merged_folder(merged, mrpc, rows, tmp_path):
    folder, template, _ = merged
    result = eval_cli.main(["--results_path", str(folder), "--dataset", mrpc, "--max_eval_samples", str(N),
                            "--output_dir", str(tmp_path / "e")])
    import pandas as pd
    labels = pd.read_parquet(Path(mrpc) / "mrpc" / "validation-00000-of-00001.parquet").head(N)["label"].to_numpy()
    accuracy = float((_plain_forward(folder, template, rows).argmax(1) == labels).mean())
    assert result["examples"] == N and result["split"] == "validation" and result["adapter"] is None
    assert abs(result["metrics"]["accuracy"] - accuracy) < 1e-12
    assert result["merged"]["merged_into"] == "original-16bit"


def test_regression_merged_folder_writes_the_score(merged, rows, tmp_path):
    """STS-B-like: one output, no label names; the column is `score`, the raw output of the head."""
    import torch
    from transformers import AutoModelForSequenceClassification
    folder, template, _ = merged
    reg = tmp_path / "stsb-merged"
    shutil.copytree(folder, reg)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, problem_type="regression",
                                                               ignore_mismatched_sizes=True, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(reg)
    info = json.loads((reg / "qlora_cls.json").read_text())
    (reg / "qlora_cls.json").write_text(json.dumps({**info, "task": "stsb", "label_names": None, "num_labels": 1}))
    model.eval()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(reg)
    with torch.no_grad():
        oracle = [float(model(**tok(template.format(**r), truncation=True, max_length=64,
                                    return_tensors="pt")).logits[0, 0]) for r in rows[:5]]
    out = tmp_path / "out.csv"
    predict.main(["--results_path", str(reg), "--input", str(_write_jsonl(tmp_path / "in.jsonl", rows[:5])),
                  "--output", str(out)])
    got = _read(out)
    assert list(got[0]) == ["idx", "score"]
    assert np.abs(np.array([float(r["score"]) for r in got]) - oracle).max() < 1e-5


def test_merged_folder_refusals(merged, runs, rows, tmp_path, capsys):
    folder, _, _ = merged
    a, _ = runs
    inp = _write_csv(tmp_path / "in.csv", rows[:2])
    assert "merged folder" in _error(["--results_path", str(folder), "--input", str(inp), "--adapter",
                                      "adapter_best"], capsys)
    assert "merged folder" in _error(["--results_path", str(a), str(folder), "--input", str(inp), "--output",
                                      str(tmp_path / "o")], capsys)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    info = json.loads((other / "qlora_cls.json").read_text())
    (other / "qlora_cls.json").write_text(json.dumps({**info, "format": "qlora-cls-merged/9"}))
    assert "qlora-cls-merged/1" in _error(["--results_path", str(other), "--input", str(inp)], capsys)


# -- several adapters on one base --------------------------------------------------------------------------
def test_several_adapters_equal_separate_runs(runs, rows, tmp_path):
    a, b = runs
    inp = _write_csv(tmp_path / "in.csv", rows)
    alone = {}
    for run in runs:
        alone[run.name] = tmp_path / f"{run.name}.csv"
        predict.main(["--results_path", str(run), "--input", str(inp), "--output", str(alone[run.name]),
                      "--chunk_size", "16"])
    summary = predict.main(["--results_path", str(a), str(b), "--input", str(inp), "--output", str(tmp_path / "both"),
                            "--chunk_size", "16"])
    for run in runs:
        assert (tmp_path / "both" / f"{run.name}.csv").read_bytes() == alone[run.name].read_bytes()
    assert alone["a"].read_bytes() != alone["b"].read_bytes()  # different heads and prompts: different outputs
    assert summary["adapters"]["switches"] == 2 * 3 - 1  # 3 chunks x 2 runs, starting on the first
    assert summary["adapters"]["switch_seconds_mean"] is not None


def test_fast_path_copies_each_run_once_and_predicts_what_the_plain_path_does(runs, rows, tmp_path, monkeypatch):
    """--fast_eval (the default): one inference copy per run for the whole file (not one per chunk), and the
    same labels as --fast_eval false, probabilities within float rounding."""
    from qlora_cls import fast_eval
    inp = _write_csv(tmp_path / "in.csv", rows)
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    predict.main(["--results_path", *map(str, runs), "--input", str(inp), "--output", str(plain), "--chunk_size", "10",
                  "--fast_eval", "false"])
    built = []
    real = fast_eval.inference_copy
    monkeypatch.setattr(fast_eval, "inference_copy", lambda model: built.append(model) or real(model))
    predict.main(["--results_path", *map(str, runs), "--input", str(inp), "--output", str(fast), "--chunk_size", "10"])
    assert len(built) == len(runs)  # 4 chunks x 2 runs, one copy per run
    for run in runs:
        p, f = _read(plain / f"{run.name}.csv"), _read(fast / f"{run.name}.csv")
        assert [r["idx"] for r in p] == [r["idx"] for r in f] and len(p) == N
        diff = max(abs(float(x[k]) - float(y[k])) for x, y in zip(p, f) for k in x if k.startswith("prob_"))
        assert diff < 2e-6
        assert [x["prediction"] for x in p if abs(float(x["prob_equivalent"]) - 0.5) > 1e-4] == \
            [y["prediction"] for x, y in zip(p, f) if abs(float(x["prob_equivalent"]) - 0.5) > 1e-4]


def test_switching_adapters_switches_heads_and_keeps_the_repack_guard(runs):
    """The head is a PEFT modules_to_save: set_adapter must select each run's own copy of it."""
    import bitsandbytes as bnb
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from qlora_cls.runs import check_same_base, load_models, open_source, tokenizer_of
    sources = [open_source(r) for r in runs]
    check_same_base(sources)
    model_path, tok = tokenizer_of(sources[0])
    loaded = load_models(sources, model_path, tok, Accelerator())
    saved = [load_file(r / "adapter" / "adapter_model.safetensors")["base_model.model.score.weight"] for r in runs]
    assert not torch.equal(saved[0], saved[1])
    for i in (1, 0, 1):
        loaded.use(i)
        head = loaded.model.get_submodule("base_model.model.score")
        assert torch.equal(head.modules_to_save[head.active_adapter].weight, saved[i])
        lora = dict(loaded.model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
        assert lora.active_adapters == [loaded.adapter_names[i]]
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert len(loaded.switch_seconds) == 3


def test_eval_several_runs_equals_separate_calls(runs, tmp_path):
    a, b = runs
    results = eval_cli.main(["--results_path", str(a), str(b), "--prompt", "none", "--overwrite"])
    both = {r: (r / "evals/validation-none/predictions.csv").read_bytes() for r in runs}
    for r, res in zip(runs, results):
        single = eval_cli.main(["--results_path", str(r), "--prompt", "none", "--output_dir", str(tmp_path / r.name)])
        assert (tmp_path / r.name / "predictions.csv").read_bytes() == both[r]
        assert single["metrics"] == res["metrics"] and "adapter_switch" in res
    assert both[a] != both[b]


def test_runs_on_different_bases_are_refused(runs, rows, tmp_path, capsys):
    a, b = runs
    other = tmp_path / "fp4"
    shutil.copytree(b, other)
    records = json.loads((other / "config.json").read_text())
    records["config"]["bnb_4bit_quant_type"] = "fp4"
    (other / "config.json").write_text(json.dumps(records))
    inp = _write_csv(tmp_path / "in.csv", rows[:2])
    line = _error(["--results_path", str(a), str(other), "--input", str(inp), "--output", str(tmp_path / "o")], capsys)
    assert "not trained on the same base" in line and "bnb_4bit_quant_type: nf4 vs fp4" in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        eval_cli.main(["--results_path", str(a), str(other)])
    assert "not trained on the same base" in capsys.readouterr().err
    assert "--output FOLDER" in _error(["--results_path", str(a), str(b), "--input", str(inp)], capsys)


def test_bad_stream_dtype_is_one_line_naming_the_choices(runs, rows, tmp_path, capsys):
    inp = _write_csv(tmp_path / "in.csv", rows[:2])
    msg = _error(["--results_path", str(runs[0]), "--input", str(inp), "--eval_stream_dtype", "bf16"], capsys)
    assert "--eval_stream_dtype" in msg and "float32" in msg and "compute" in msg
    assert [p.name for p in tmp_path.iterdir()] == ["in.csv"]  # no output begun
