"""eval.py on finished generative runs (ft.py --objective sft | lm): the held-out data and the model rebuilt as ft.py
built them, scored by the same evaluation, so the final adapter's figures are metrics.json's final ones and
--base_only's are its base-model ones (runs with --fast_eval false, evaluated the same way)."""
from __future__ import annotations

import json

import pytest

import eval as eval_py
from generative_runs import finished_run

FIGURES = {"sft": ("answer_loss", "answer_perplexity", "answer_tokens", "stop_rate", "exact_match", "rouge_l"),
           "lm": ("perplexity", "nll", "eval_tokens")}


@pytest.mark.parametrize("name,folder", [("qlora", "validation-tokenizer"), ("lora-utterances", "validation-utterances"),
                                         ("lm", "validation-lm")])
def test_eval_reproduces_the_runs_final_and_base_model_figures(name, folder, tmp_path_factory, capsys):
    run = finished_run(tmp_path_factory, name)
    summary = json.loads((run / "metrics.json").read_text())
    objective = summary["objective"]
    for base_only, expected, suffix in ((False, summary["final"], ""), (True, summary["baseline"]["metrics"], "-base")):
        result = eval_py.main(["--results_path", str(run), "--fast_eval", "false"] + (["--base_only"] if base_only else []))
        out = run / "evals" / (folder + suffix)
        for k in FIGURES[objective]:
            assert result["metrics"][k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12), k
        assert json.loads((out / "metrics.json").read_text())["metrics"] == result["metrics"]
        if objective == "sft":  # the same greedy generations as the run wrote
            ran = run / ("generations_validation_base.jsonl" if base_only else "generations_validation.jsonl")
            assert (out / "generations_validation.jsonl").read_text() == ran.read_text()
        printed = capsys.readouterr().out
        other = "the run's final adapter" if base_only else "the base model"
        main = "answer_perplexity" if objective == "sft" else "perplexity"
        assert f"{main}={result['metrics'][main]:.4f}" in printed and f"   {other}: {main}=" in printed


def test_figures_of_other_examples_are_not_put_beside_the_evaluation(tmp_path_factory, capsys):
    """metrics.json scored all the held-out text; --max_eval_samples 2 scores its first 2 blocks: the run's figures
    are not printed or recorded as if they were on the same examples."""
    run = finished_run(tmp_path_factory, "lm")
    summary = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "config.json").read_text())["config"]["max_eval_samples"] is None
    result = eval_py.main(["--results_path", str(run), "--fast_eval", "false", "--base_only", "--max_eval_samples", "2",
                           "--output_dir", str(tmp_path_factory.mktemp("first2"))])
    assert result["metrics"]["eval_tokens"] < summary["final"]["eval_tokens"]
    assert result["compared_with"]["metrics"] == {}
    printed = capsys.readouterr().out
    assert "the run's final adapter is not shown: metrics.json scored all held-out examples, this evaluation the " \
           "first 2" in printed and f"perplexity={summary['final']['perplexity']:.4f}" not in printed


@pytest.mark.parametrize("flags,line", [
    (["--split", "test"], "--split test: "),
    (["--prompt", "plain"], "--prompt plain: "),
    (["--dataset", "x"], "--dataset x: "),
])
def test_classification_flags_on_a_generative_run_are_refused_in_one_line(flags, line, tmp_path_factory, capsys):
    run = finished_run(tmp_path_factory, "qlora")
    capsys.readouterr()  # the training's own output, when this test is the first to need the run
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        eval_py.main(["--results_path", str(run), "--output_dir", str(run / "evals" / "refused"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and line in err[0] and "--objective sft run" in err[0], err
    assert sorted(p.name for p in run.rglob("*")) == before


def test_several_runs_with_a_generative_one_are_refused(tmp_path_factory, capsys):
    run = finished_run(tmp_path_factory, "qlora")
    capsys.readouterr()  # the training's own output, when this test is the first to need the run
    with pytest.raises(SystemExit) as exc:
        eval_py.main(["--results_path", str(run), str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "one at a time" in err[0]
