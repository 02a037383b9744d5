"""Bad input, round two: each case is one line naming what is wrong and what is valid, exit 2, before any
model load, and nothing of the user's is created or changed."""
import json
import shutil

import pytest

import eval as eval_cli
import ft
import sweep
from conftest import tiny_args


def _one_line_error(main, argv, capsys, prog="ft.py"):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith(f"{prog}: error:")]
    assert exc.value.code == 2 and len(err) == 1, err
    return err[0]


def _files(tmp_path):
    f = {"good.csv": "text,label\nfirst example,0\nsecond one,1\n",
         "empty.csv": "",
         "header.csv": "text,label\n",
         "othercols.csv": "sentence,label\nan example,0\n",
         "nan.csv": "text,label\nfine,0\n,1\nalso fine,0\n",
         "good.jsonl": '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n',
         "broken.jsonl": '{"text": "a", "label": 0}\n{"text": "b", "label": 1\n',
         "fieldless.txt": "Is this good?\n",
         "empty.txt": "\n",
         "latin1.txt": None}
    for name, text in f.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 {text}".encode("latin-1"))
    return tmp_path


CASES = {  # name: (flags after the tiny-model/data flags, words the one line must contain)
    "negative lr": (["--lr", "-1e-4"], ["--lr must be a positive number", "-0.0001"]),
    "resume without path": (["--resume"], ["--resume needs --results_path"]),
    "max_length below the prompt": (["--max_length", "1"], ["--max_length 1 leaves no room", "tokens"]),
    "template without a field": (["--prompt", "{d}/fieldless.txt"], ["no field for the text", "{text}"]),
    "empty template": (["--prompt", "{d}/empty.txt"], ["is empty"]),
    "template not utf-8": (["--prompt", "{d}/latin1.txt"], ["not UTF-8"]),
    "empty csv": (["--validation_file", "{d}/empty.csv"], ["--validation_file", "empty.csv is empty (0 bytes)"]),
    "header-only csv": (["--validation_file", "{d}/header.csv"], ["header (text, label) but no rows"]),
    "columns differ": (["--validation_file", "{d}/othercols.csv"], ["columns sentence, label", "text, label"]),
    "empty text cell": (["--validation_file", "{d}/nan.csv"], ["column 'text' is empty in 1 row(s)", "row(s) 2"]),
    "broken jsonl": (["--train_file", "{d}/good.jsonl", "--validation_file", "{d}/broken.jsonl"],
                     ["broken.jsonl line 2 is not valid JSON"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ft_bad_input_is_one_line_before_loading(tiny_model, tmp_path, capsys, case):
    d = _files(tmp_path)
    flags, words = CASES[case]
    flags = [f.replace("{d}", str(d)) for f in flags]
    results = tmp_path / "run"
    argv = ["--model_dir", tiny_model, "--train_file", str(d / "good.csv"), "--validation_file", str(d / "good.csv"),
            "--text_columns", "text", "--prompt", "none", "--max_steps", "1"]
    argv += flags if case == "resume without path" else [*flags, "--results_path", str(results)]
    before = {p: p.read_bytes() for p in d.iterdir() if p.is_file()}
    line = _one_line_error(ft.main, argv, capsys)
    assert all(w in line for w in words), line
    assert not results.exists() and {p: p.read_bytes() for p in d.iterdir() if p.is_file()} == before


def test_sweep_grid_error_names_grid(tmp_path, capsys):
    line = _one_line_error(sweep.main, ["--grid", str(tmp_path / "missing.yaml")], capsys, "sweep.py")
    assert "--grid" in line and "--config" not in line


@pytest.fixture(scope="module")
def finished_run(tiny_model, mrpc, tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    summary = ft.main(tiny_args(tiny_model, mrpc, path, "--max_eval_samples", "29"))
    return path, summary


def test_eval_with_no_flags_reproduces_the_run(finished_run, tmp_path):
    """Same split, same --max_eval_samples (29 here), same prompt as the run: the same numbers."""
    path, summary = finished_run
    result = eval_cli.main(["--results_path", str(path), "--output_dir", str(tmp_path / "e")])
    assert result["split"] == "validation" and result["examples"] == 29 and result["max_eval_samples"] == 29
    assert result["metrics"] == {k: summary["final"][k] for k in ("accuracy", "f1")}
    assert json.loads((tmp_path / "e/metrics.json").read_text())["max_eval_samples"] == 29
    every = eval_cli.main(["--results_path", str(path), "--output_dir", str(tmp_path / "all"),
                           "--max_eval_samples", "0"])
    assert every["examples"] == 408 and every["max_eval_samples"] is None  # 0 = the whole split


def test_eval_output_dir_that_is_a_file(finished_run, tmp_path, capsys):
    path, _ = finished_run
    f = tmp_path / "taken"
    f.write_text("mine")
    line = _one_line_error(eval_cli.main, ["--results_path", str(path), "--output_dir", str(f)], capsys, "eval.py")
    assert "is a file" in line and f.read_text() == "mine"


def test_eval_adapter_best_when_best_was_final(finished_run, tmp_path, capsys):
    path, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(path, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    shutil.rmtree(copy / "adapter_best", ignore_errors=True)
    metrics.update(best_epoch=0, has_adapter_best=False)
    (copy / "metrics.json").write_text(json.dumps(metrics))
    line = _one_line_error(eval_cli.main, ["--results_path", str(copy), "--adapter", "adapter_best"], capsys, "eval.py")
    assert "best epoch (0) was the final one" in line and "adapter/ holds it" in line


def test_eval_of_an_unfinished_run_says_so(finished_run, tmp_path, caplog):
    path, summary = finished_run
    copy = tmp_path / "run"
    shutil.copytree(path, copy)
    (copy / "metrics.json").unlink()
    result = eval_cli.main(["--results_path", str(copy)])
    assert result["run_finished"] is False
    assert any("did not finish" in r.getMessage() and "adapter" in r.getMessage() for r in caplog.records)


def test_truncation_is_counted_in_a_warning(tiny_model, mrpc, tmp_path, caplog):
    """MRPC's 'perfect' prompt is ~22 tokens and its examples 50-100: at --max_length 40 nearly all are cut."""
    ft.main(tiny_args(tiny_model, mrpc, tmp_path / "r", "--max_length", "40", "--dry_run"))
    lines = [r.getMessage() for r in caplog.records if "reached --max_length 40" in r.getMessage()]
    assert any(line.startswith("37 of 37 validation examples (100.0%)") for line in lines), lines
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
