"""bench/parity.py end to end on the tiny model: both sides per seed, resumable state, mean ± std by a second route."""
import json

import numpy as np
import pytest

from bench import parity

pytestmark = pytest.mark.slow  # four training subprocesses


def test_parity_runs_both_sides_per_seed_and_skips_finished_runs(tiny_model, mrpc, tmp_path):
    argv = ["--seeds", "1", "2", "--epochs", "1", "--model_dir", tiny_model, "--dataset", mrpc,
            "--max_train_samples", "16", "--max_eval_samples", "8", "--state_dir", str(tmp_path / "state"),
            "--out", str(tmp_path / "out")]
    report = parity.main(argv)
    runs = report["runs"]
    assert sorted((r["side"], r["seed"]) for r in runs) == [("ft", 1), ("ft", 2), ("trainer", 1), ("trainer", 2)]
    # 16 examples / batch 8 = 2 optimizer steps per epoch, on both sides
    assert {r["train_steps"] for r in runs} == {2}
    assert {r["compute_dtype"] for r in runs if r["side"] == "trainer"} == {"bfloat16"}
    for side in ("ft", "trainer"):
        acc = np.array([100 * r["accuracy"] for r in runs if r["side"] == side])
        s = report["sides"][side]
        assert s["runs"] == 2
        assert s["accuracy_mean"] == pytest.approx(acc.mean()) and s["accuracy_std"] == pytest.approx(acc.std(ddof=1))
    diff = report["sides"]["ft"]["accuracy_mean"] - report["sides"]["trainer"]["accuracy_mean"]
    assert report["accuracy_points_ft_minus_trainer"] == pytest.approx(diff)
    assert report["target_met"] is None  # two seeds are no verdict
    md = (tmp_path / "out" / "parity.md").read_text()
    assert "fewer than 3 seeds finished on both sides" in md and md.count("| ft.py (defaults) | ") == 2 + 1  # a row per run, one summary row
    # A second call runs nothing: the finished runs' result files stay as they were.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "state").glob("*/result.json")}
    again = parity.main(argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and again["runs"] == runs
    # ft.py's side is a normal run folder (resumable with --resume; checkpoints every 50 steps)
    cfg = json.loads((tmp_path / "state" / "ft-seed1" / "run" / "config.json").read_text())["config"]
    assert cfg["checkpoint_every"] == 50 and cfg["seed"] == 1


def test_parity_refuses_unknown_side(capsys):
    with pytest.raises(SystemExit) as exc:
        parity.main(["--sides", "ft,keras"])
    assert exc.value.code == 2
    assert "--sides: unknown keras; valid: ft, trainer" in capsys.readouterr().err


def test_trainer_side_scores_its_predictions_against_their_own_labels(tiny_model, mrpc, tmp_path):
    """With length grouping the Trainer evaluates in length order too; the score must not pair shuffled
    predictions with the dataset's labels. Oracle: the saved adapter re-run one example at a time, in order."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from bench.bench import tokenized_data, train_config
    from qlora_cls.modeling import disable_cpu_weight_repacking

    argv = ["--sides", "trainer", "--seeds", "1", "--epochs", "1", "--model_dir", tiny_model, "--dataset", mrpc,
            "--max_train_samples", "16", "--max_eval_samples", "37", "--state_dir", str(tmp_path / "state"),
            "--out", str(tmp_path / "out")]
    [run] = parity.main(argv)["runs"]
    cfg = train_config(parity._bench_args(parity.parse_args(argv), 1, steps=2), "bfloat16")
    model_path, tokenizer, spec, data = tokenized_data(cfg)
    val = data["validation"]
    assert len(set(val["length"])) > 1  # lengths differ, so length order is not dataset order
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=2, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_cpu_weight_repacking(model)
    [checkpoint] = (tmp_path / "state" / "trainer-seed1" / "trainer").glob("checkpoint-*")
    model = PeftModel.from_pretrained(model, str(checkpoint)).eval()
    with torch.no_grad():
        preds = np.array([int(model(input_ids=torch.tensor([ids])).logits.argmax(-1)) for ids in val["input_ids"]])
    labels = np.array(val["labels"])
    assert 0 < preds.mean() < 1  # both classes predicted: a shuffled pairing would score differently
    assert run["accuracy"] == pytest.approx((preds == labels).mean())
    tp = ((preds == 1) & (labels == 1)).sum()
    assert run["f1"] == pytest.approx(2 * tp / (2 * tp + (preds != labels).sum()))


def test_a_resumed_trainer_run_counts_the_training_time_of_the_processes_before_it(tiny_model, mrpc, tmp_path):
    import json as _json
    from bench.bench import run_trainer
    args = parity._bench_args(parity.parse_args(["--model_dir", tiny_model, "--dataset", mrpc, "--max_train_samples",
                                                 "16", "--max_eval_samples", "8"]), 1, steps=2)
    state = tmp_path / "trainer"
    first = run_trainer(args, True, "bfloat16", state_dir=state)
    saved = _json.loads((state / "train_seconds.json").read_text())
    assert saved["step"] == 2 and 0 < saved["seconds"] <= first["train_seconds"]
    # A second process finds checkpoint-2 (all steps done): its time is the first one's, not ~0.
    again = run_trainer(args, True, "bfloat16", state_dir=state)
    assert again["train_seconds"] >= saved["seconds"]
    assert again["accuracy"] == first["accuracy"]
    # A checkpoint whose time was not recorded is refused rather than reported as a short run.
    (state / "train_seconds.json").write_text(_json.dumps({"step": 1, "seconds": 5.0}))
    with pytest.raises(SystemExit, match="training time is unknown"):
        run_trainer(args, True, "bfloat16", state_dir=state)


def test_summary_gives_the_standard_error_of_the_difference_by_hand():
    runs = [{"side": "ft", "seed": k, "accuracy": a, "f1": 0.8} for k, a in enumerate((0.75, 0.80, 0.78))] + \
           [{"side": "trainer", "seed": k, "accuracy": a, "f1": 0.8} for k, a in enumerate((0.79, 0.80, 0.77))]
    s = parity.summarize(runs)
    # ft: mean 77.667, sample variance ((-2.667)^2 + 2.333^2 + 0.333^2) / 2 = 6.3333; trainer: 78.667, variance
    # (0.333^2 + 1.333^2 + 1.667^2) / 2 = 2.3333
    assert s["accuracy_points_ft_minus_trainer"] == pytest.approx(77.6667 - 78.6667, abs=1e-3)
    assert s["accuracy_points_standard_error"] == pytest.approx((6.3333 / 3 + 2.3333 / 3) ** 0.5, abs=1e-3)
    assert s["target_met"] is False  # -1.0 < -0.5


def test_the_means_and_the_verdict_use_only_seeds_both_sides_ran():
    """A side's extra seeds stay out: with them the two means would average different seeds."""
    runs = [{"side": "ft", "seed": k, "accuracy": a, "f1": 0.8} for k, a in ((1, 0.75), (2, 0.80), (3, 0.78))] + \
           [{"side": "trainer", "seed": k, "accuracy": a, "f1": 0.8}
            for k, a in ((1, 0.78), (2, 0.79), (3, 0.80), (4, 0.60), (5, 0.60))]
    s = parity.summarize(runs)
    # seeds 1-3: ft 77.667, trainer 79.0 -> -1.333 (all five trainer runs would give 71.4 and a false "met")
    assert s["seeds_compared"] == [1, 2, 3] and s["unpaired"] == ["trainer seed 4", "trainer seed 5"]
    assert s["sides"]["trainer"]["runs"] == 3 and s["sides"]["trainer"]["accuracy_mean"] == pytest.approx(79.0)
    assert s["accuracy_points_ft_minus_trainer"] == pytest.approx(-1.3333, abs=1e-3) and s["target_met"] is False
    shown = [{**r, "compute_dtype": "bfloat16", "train_steps": 918, "train_seconds": 1.0} for r in runs]
    md = parity.markdown(parity.parse_args([]), shown, s)
    assert "not in them (no run of the other side yet): trainer seed 4, trainer seed 5" in md


def test_paired_differences_use_only_seeds_both_sides_ran():
    runs = [{"side": "ft", "seed": k, "accuracy": a, "f1": 0.8} for k, a in ((1, 0.75), (2, 0.80), (3, 0.78))] + \
           [{"side": "trainer", "seed": k, "accuracy": a, "f1": 0.8} for k, a in ((1, 0.78), (2, 0.79))]
    p = parity.summarize(runs)["paired_by_seed"]
    # seeds 1 and 2: differences -3 and +1 points; mean -1, sample std 2.828, standard error 2.828 / sqrt(2) = 2
    assert p["seeds"] == 2 and p["mean"] == pytest.approx(-1.0) and p["standard_error"] == pytest.approx(2.0)
