"""Every GLUE task with default flags, MNLI's two validation sets, a 4-class CSV in the AG News layout, and the
prompt templates of every task. Data: a hub-layout fixture (conftest.build_glue_fixture) and CSV files."""
import csv
import json

import pytest

import ft
from conftest import GLUE_FIXTURE
from qlora_cls.prompts import available_templates, load_template
from qlora_cls.tasks import GLUE_TASKS

STUDY = ("none", "perfect", "conflicting", "insufficient")


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_every_task_has_the_four_templates_on_its_own_columns(task):
    columns, names, _ = GLUE_FIXTURE[task]
    assert set(available_templates(task)) >= set(STUDY)
    row = {c: f"<{c}>" for c in columns}
    texts = {}
    for name in STUDY:
        bound = load_template(name, task).bind(GLUE_TASKS[task].text_columns, names)
        assert set(bound.fields) == set(columns), (name, bound.fields)  # every text column, nothing else
        texts[name] = bound.render(row)
        assert all(f"<{c}>" in texts[name] for c in columns)
    assert len(set(texts.values())) == 4  # four different prompts
    assert texts["none"] == texts["none"].strip() and all(t.endswith(texts["none"]) for t in texts.values())


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_every_glue_task_trains_with_default_flags(tiny_model, glue_fixture, tmp_path, task):
    run = tmp_path / task
    summary = ft.main(["--model_dir", tiny_model, "--dataset", glue_fixture, "--task", task,
                       "--results_path", str(run), "--max_steps", "2"])
    spec = GLUE_TASKS[task]
    assert set(spec.metrics) <= set(summary["final"]) and summary["eval_split"] == spec.validation_split
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["num_labels"] == (1 if GLUE_FIXTURE[task][1] is None else len(GLUE_FIXTURE[task][1]))
    assert resolved["label_names"] == GLUE_FIXTURE[task][1]
    prompt = (run / "prompt.txt").read_text().strip()
    assert prompt == (load_template("perfect", task).text)  # the task's own "perfect" template
    if task == "mnli":  # matched selects epochs; mismatched is scored with the final weights
        other = summary["other_splits"]["validation_mismatched"]
        assert set(other) >= {"accuracy"} and (run / "predictions_validation_mismatched.csv").is_file()
        rows = list(csv.reader((run / "predictions_validation_mismatched.csv").open()))
        assert len(rows) == 1 + 12 and rows[0][3:] == [f"prob_{n}" for n in GLUE_FIXTURE["mnli"][1]]
        # the accuracy recomputed from the written predictions (an independent count)
        assert other["accuracy"] == sum(r[1] == r[2] for r in rows[1:]) / 12
    else:
        assert summary["other_splits"] == {}


AG_NEWS = ["World", "Sports", "Business", "Sci/Tech"]


def _ag_news(path, n, label_of):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            w.writerow([f"news item {i} about " + ["war", "football", "stocks", "chips"][i % 4] * (1 + i % 3),
                        label_of(i % 4)])
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("labels", ["ids+names", "names", "names-inferred"])
def test_four_class_csv_in_ag_news_layout(tiny_model, tmp_path, labels):
    by_name = labels != "ids+names"
    label_of = (lambda i: AG_NEWS[i]) if by_name else (lambda i: i)
    train = _ag_news(tmp_path / "train.csv", 32, label_of)
    test = _ag_news(tmp_path / "test.csv", 12, label_of)
    extra = [] if labels == "names-inferred" else ["--label_names", *AG_NEWS]
    run = tmp_path / "run"
    summary = ft.main(["--model_dir", tiny_model, "--train_file", train, "--validation_file", test,
                       "--text_columns", "text", "--results_path", str(run), "--max_steps", "2", *extra])
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    names = sorted(AG_NEWS) if labels == "names-inferred" else AG_NEWS
    assert resolved["num_labels"] == 4 and resolved["label_names"] == names
    # the label ids written with the predictions are the names' positions in label_names
    rows = list(csv.DictReader((run / "predictions_validation.csv").open()))
    assert [int(r["label"]) for r in rows] == [names.index(AG_NEWS[i % 4]) for i in range(12)]
    assert summary["final"]["accuracy"] == sum(r["label"] == r["prediction"] for r in rows) / 12
    # the generic "perfect" prompt names the classes and the text column
    assert (run / "prompt.txt").read_text().strip() == f"Which of these labels fits: {', '.join(names)}? Text: {{text}}"


def test_unknown_label_name_is_one_line(tiny_model, tmp_path, capsys):
    train = _ag_news(tmp_path / "train.csv", 8, lambda i: AG_NEWS[i])
    with pytest.raises(SystemExit) as exc:
        ft.main(["--model_dir", tiny_model, "--train_file", train, "--validation_file", train, "--text_columns",
                 "text", "--label_names", "World", "Sports", "Business", "--results_path", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "'Sci/Tech'" in err and "World Sports Business" in err
    assert not (tmp_path / "r").exists()
