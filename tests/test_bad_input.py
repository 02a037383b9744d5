"""Bad input, rounds two and three: each case is one line naming what is wrong and what is valid, exit 2,
before any model load, and nothing of the user's is created or changed."""
import json
import logging
import shutil
from pathlib import Path

import pytest

import eval as eval_cli
import ft
import merge
import predict
import report
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


# -- round three (issue 32) ---------------------------------------------------------------------------------

def _snapshot(*folders) -> dict:
    """Every file under the folders with its bytes: compared before and after a refused command."""
    return {p: p.read_bytes() for d in folders for p in sorted(Path(d).rglob("*")) if p.is_file()}


LABEL_FILES = {  # name: (train rows, validation rows) as (text, label)
    "csv": ("csv", [("good movie", "neg"), ("bad movie", "pos")], [("great", 0), ("terrible", 1)]),
    "csv numbers then names": ("csv", [("good movie", 0), ("bad movie", 1)], [("great", "neg"), ("awful", "pos")]),
    "jsonl": ("jsonl", [("good movie", "neg"), ("bad movie", "pos")], [("great", 0), ("terrible", 1)]),
    "jsonl spelling": ("jsonl", [("good movie", "neg"), ("bad movie", "pos")], [("great", "negative"), ("x", "pos")]),
}


def _label_file(path: Path, fmt: str, rows) -> str:
    if fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    else:
        path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    return str(path)


@pytest.mark.parametrize("names", [False, True], ids=["no names", "label_names"])
@pytest.mark.parametrize("case", list(LABEL_FILES))
def test_label_values_that_disagree_between_files_are_refused(tiny_model, tmp_path, capsys, case, names):
    """neg/pos in one file and 0/1 in another once trained silently as a 4-class model."""
    fmt, train_rows, valid_rows = LABEL_FILES[case]
    train = _label_file(tmp_path / f"train.{fmt}", fmt, train_rows)
    valid = _label_file(tmp_path / f"valid.{fmt}", fmt, valid_rows)
    given = ["--label_names", *sorted({str(l) for _, l in train_rows})] if names else []
    before = _snapshot(tmp_path)
    line = _one_line_error(ft.main, ["--model_dir", tiny_model, "--train_file", train, "--validation_file", valid,
                                     "--text_columns", "text", "--prompt", "none", "--max_steps", "1",
                                     "--results_path", str(tmp_path / "run"), *given], capsys)
    odd = [repr(str(l)) for _, l in valid_rows if str(l) not in {str(l) for _, l in train_rows}]
    assert f"valid.{fmt}" in line and all(v in line for v in odd), line
    if names:
        assert "not among the label names" in line and " ".join(given[1:]) in line
    else:
        assert "label values disagree" in line and f"train.{fmt}" in line and "--label_names" in line
    assert _snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_broken_json_line_is_reported_once_with_the_same_column(finished_run, tiny_model, tmp_path, capsys, caplog):
    """No datasets ERROR lines ("row 1") before the one line; predict.py and ft.py agree on the column."""
    line2 = '{"sentence1": "b", "sentence2": "c", "label": 1'
    (tmp_path / "good.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 0}\n')
    (tmp_path / "broken.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 0}\n' + line2 + "\n")
    before = _snapshot(tmp_path)
    where = f"line 2 is not valid JSON (Expecting ',' delimiter, column {len(line2) + 1})"
    line = _one_line_error(ft.main, ["--model_dir", tiny_model, "--train_file", str(tmp_path / "broken.jsonl"),
                                     "--validation_file", str(tmp_path / "good.jsonl"), "--text_columns", "sentence1",
                                     "--results_path", str(tmp_path / "run")], capsys)
    assert where in line, line
    assert not [r for r in caplog.records if r.name.startswith("datasets") and r.levelno >= logging.ERROR]
    line = _one_line_error(predict.main, ["--results_path", str(finished_run[0]), "--input",
                                          str(tmp_path / "broken.jsonl"), "--output", str(tmp_path / "p.csv")],
                           capsys, "predict.py")
    assert where in line, line
    assert _snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def local_run(tiny_model, tmp_path_factory):
    """A run on local CSV files whose labels are names (neg/pos)."""
    d = tmp_path_factory.mktemp("local")
    rows = [(f"example {i} " + "word " * (i % 5), ["neg", "pos"][i % 2]) for i in range(24)]
    train, valid = _label_file(d / "train.csv", "csv", rows), _label_file(d / "valid.csv", "csv", rows[:8])
    ft.main(["--model_dir", tiny_model, "--train_file", train, "--validation_file", valid, "--text_columns", "text",
             "--prompt", "none", "--max_steps", "2", "--eval_batch_size", "8", "--results_path", str(d / "run")])
    return d / "run"


def test_eval_checks_the_data_against_the_runs_labels(local_run, tmp_path, capsys):
    """A run's validation file rewritten with 0/1: eval.py refuses it (the run's labels are neg/pos)."""
    copy = tmp_path / "run"
    shutil.copytree(local_run, copy)
    valid = _label_file(tmp_path / "valid01.csv", "csv", [("great", 0), ("terrible", 1)])
    records = json.loads((copy / "config.json").read_text())
    records["config"]["validation_file"] = valid
    (copy / "config.json").write_text(json.dumps(records))
    before = _snapshot(tmp_path)
    line = _one_line_error(eval_cli.main, ["--results_path", str(copy)], capsys, "eval.py")
    assert "valid01.csv" in line and "'0', '1'" in line and "neg pos" in line, line
    assert _snapshot(tmp_path) == before


def test_hub_layout_labels_are_checked_against_the_runs(finished_run, glue_fixture, tmp_path, capsys):
    """GLUE in hub layout whose label names differ from the run's (MRPC's not_equivalent, equivalent)."""
    glue = tmp_path / "glue"
    shutil.copytree(glue_fixture, glue)
    card = glue / "README.md"
    card.write_text(card.read_text().replace("'1': equivalent", "'1': paraphrase"))
    before = _snapshot(tmp_path, finished_run[0])
    line = _one_line_error(eval_cli.main, ["--results_path", str(finished_run[0]), "--dataset", str(glue)], capsys,
                           "eval.py")
    assert "not_equivalent, paraphrase, not not_equivalent, equivalent" in line, line
    assert _snapshot(tmp_path, finished_run[0]) == before


@pytest.fixture(scope="module")
def merged_folder(finished_run, tmp_path_factory):
    return merge.main(["--results_path", str(finished_run[0]),
                       "--output_dir", str(tmp_path_factory.mktemp("merged") / "m")])


MERGED_PARTS = {  # file(s) removed: words of the one line
    "model.safetensors": ["lacks weights (model.safetensors)"],
    "config.json": ["lacks config.json"],
    "tokenizer*": ["lacks tokenizer files"],
    "prompt.txt": ["lacks prompt.txt"],
    "qlora_cls.json": ["holds a transformers model but no qlora_cls.json", "merge.py"],
}


@pytest.mark.parametrize("part", list(MERGED_PARTS))
def test_broken_merged_folder_is_one_line_before_any_data(merged_folder, mrpc, tmp_path, capsys, monkeypatch, part):
    copy = tmp_path / "m"
    shutil.copytree(merged_folder, copy)
    for f in copy.glob(part):
        f.unlink()
    from qlora_cls import pipeline
    monkeypatch.setattr(pipeline, "prepare_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    before = _snapshot(tmp_path)
    line = _one_line_error(eval_cli.main, ["--results_path", str(copy), "--dataset", mrpc], capsys, "eval.py")
    assert all(w in line for w in MERGED_PARTS[part]) and "one of:" not in line, line
    assert "run folder written by ft.py" not in line
    assert _snapshot(tmp_path) == before


def test_unfinished_run_hints_name_flags_that_exist(finished_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished_run[0], copy)
    (copy / "metrics.json").unlink()
    shutil.rmtree(copy / "adapter")
    (tmp_path / "in.csv").write_text("sentence1,sentence2\na b,c d\n")
    before = _snapshot(tmp_path)
    line = _one_line_error(predict.main, ["--results_path", str(copy), "--input", str(tmp_path / "in.csv")], capsys,
                           "predict.py")
    assert "--resume" in line and "--base_only" not in line, line
    line = _one_line_error(eval_cli.main, ["--results_path", str(copy)], capsys, "eval.py")
    assert "--resume" in line and "--base_only" in line, line  # eval.py has --base_only
    line = _one_line_error(merge.main, ["--results_path", str(copy), "--output_dir", str(tmp_path / "m")], capsys,
                           "merge.py")
    assert "--resume" in line and "--adapter" not in line, line
    assert _snapshot(tmp_path) == before


def test_report_of_an_unfinished_run_says_so(finished_run, tmp_path):
    copy = tmp_path / "runs" / "run"
    shutil.copytree(finished_run[0], copy)
    (copy / "metrics.json").unlink()
    md = Path(report.main([str(tmp_path / "runs")])["out"] / "report.md").read_text()
    assert "**Runs:** 0 finished, 1 unfinished" in md and "predate" not in md, md


def test_refused_report_metric_creates_no_folder(finished_run, tmp_path, capsys):
    before = _snapshot(finished_run[0])
    line = _one_line_error(report.main, [str(finished_run[0]), "--out", str(tmp_path / "r"), "--metric", "nosuch"],
                           capsys, "report.py")
    assert "--metric nosuch" in line and "accuracy" in line
    assert not (tmp_path / "r").exists() and _snapshot(finished_run[0]) == before


def test_a_file_where_a_folder_is_needed_is_called_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for main, prog, argv in ((eval_cli.main, "eval.py", ["--results_path", str(f)]),
                             (predict.main, "predict.py", ["--results_path", str(f), "--input", str(f)]),
                             (merge.main, "merge.py", ["--results_path", str(f), "--output_dir", str(tmp_path / "m")]),
                             (report.main, "report.py", [str(f)])):
        line = _one_line_error(main, argv, capsys, prog)
        assert "is a file" in line and "no such folder" not in line, (prog, line)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and f.read_text() == "mine"


@pytest.mark.parametrize("grid,words", [("r: [eight, 16]\nprompt: [none, perfect]\n", ["--r", "'eight'"]),
                                        ("r: []\nprompt: [none, perfect]\n", ["r has an empty list of values"])])
def test_grid_file_values_are_checked_naming_the_file(tmp_path, capsys, grid, words):
    (tmp_path / "g.yaml").write_text(grid)
    line = _one_line_error(sweep.main, ["--grid", str(tmp_path / "g.yaml"), "--sweep_dir", str(tmp_path / "sw")],
                           capsys, "sweep.py")
    assert line.count("--grid") == 1 and "g.yaml" in line and all(w in line for w in words), line
    assert "invalid literal" not in line and not (tmp_path / "sw").exists()


def test_config_file_value_of_the_wrong_type_names_the_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("r: eight\n")
    line = _one_line_error(ft.main, ["--config", str(tmp_path / "c.yaml")], capsys)
    assert "c.yaml" in line and "'eight'" in line and "invalid literal" not in line, line


@pytest.mark.parametrize("flag", ["--model_dir", "--dataset"])
def test_ft_path_that_is_a_file_is_called_a_file(tiny_model, mrpc, tmp_path, capsys, flag):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    argv = tiny_args(tiny_model, mrpc, tmp_path / "run")
    argv[argv.index(flag) + 1] = str(f)
    line = _one_line_error(ft.main, argv, capsys)
    assert f"{flag} {f} is a file" in line and "no such folder" not in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and f.read_text() == "mine"


# -- the generative objectives (issue 29): one line, exit 2, no run folder, before any weight is read ------------
GENERATIVE_CASES = {
    "missing field": ('[{"instruction": "Say hi.", "answer": "hi"}]', "train.json", [], "has no field output (it has: instruction, answer)"),
    "empty answer": ('[{"instruction": "Say hi.", "input": "", "output": "  "}]', "train.json", [], "empty"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}\n', "train.jsonl", [], "assistant"),
    "non-UTF-8": (None, "train.jsonl", [], "UTF-8"),
    "template without the answer slot": ('[{"instruction": "Say hi.", "input": "", "output": "hi"}]', "train.json",
                                         ["--chat_template", "{slot}"], "answer"),
    "lm without text": (None, None, ["--objective", "lm"], "--objective lm trains on plain text"),
}


@pytest.mark.parametrize("case", list(GENERATIVE_CASES))
def test_generative_bad_input_is_one_line_before_any_work(case, tiny_model, tmp_path, capsys):
    text, name, extra, expected = GENERATIVE_CASES[case]
    args = ["--model_dir", tiny_model, "--results_path", str(tmp_path / "run")]
    if name:
        path = tmp_path / name
        if text is None:
            path.write_bytes(b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n')  # Latin-1, not UTF-8
        else:
            path.write_text(text)
        args += ["--objective", "sft", "--train_file", str(path), "--eval_holdout", "1"]
    if "{slot}" in extra:
        template = tmp_path / "noslot.jinja"
        template.write_text("{% for m in messages %}<|turn|>{{ m['role'] }}<|end|>\n{% endfor %}")
        extra = [x.replace("{slot}", str(template)) for x in extra]
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_line_error(ft.main, args + extra, capsys)
    assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, nothing touched


# -- predict.py on a generative run (issue 29): one line, exit 2, nothing created, before the model loads ----------
PREDICT_GENERATIVE_CASES = {  # name: (input file name, its bytes, words the one line must contain)
    "missing column": ("in.csv", b"question,answer\nWhat?,That.\n", "lacks column(s) instruction"),
    "empty jsonl": ("in.jsonl", b"", "has no rows"),
    "empty csv": ("in.csv", b"", "is empty"),
    "non-UTF-8": ("in.jsonl", '{"instruction": "Caf\xe9?"}\n'.encode("latin-1"), "not UTF-8"),
    "answer alone": ("in.jsonl", b'{"messages": [{"role": "assistant", "content": "hi"}]}\n', "only an assistant turn"),
}


@pytest.mark.parametrize("case", list(PREDICT_GENERATIVE_CASES))
def test_predict_on_a_generative_run_refuses_bad_input_before_loading(case, tmp_path_factory, tmp_path, capsys,
                                                                      monkeypatch):
    from generative_runs import finished_run as generative_run

    from qlora_cls import pipeline
    run = generative_run(tmp_path_factory, "lora-utterances")
    name, data, expected = PREDICT_GENERATIVE_CASES[case]
    (tmp_path / name).write_bytes(data)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(pipeline, "build_model", no_model)
    run_files = sorted(p.name for p in run.rglob("*"))
    line = _one_line_error(predict.main, ["--results_path", str(run), "--input", str(tmp_path / name),
                                          "--output", str(tmp_path / "out.csv")], capsys, "predict.py")
    assert expected in line, line
    assert [p.name for p in tmp_path.iterdir()] == [name] and sorted(p.name for p in run.rglob("*")) == run_files
