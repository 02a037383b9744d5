"""bench/bench.py end to end on the tiny model: every arm runs, JSON and Markdown carry all arms and ratios."""
import json
from pathlib import Path

import pytest

from bench import bench


@pytest.mark.slow
def test_bench_smoke_writes_all_arms_and_ratios(tiny_model, mrpc, tmp_path):
    out = bench.main(["--steps", "2", "--model_dir", tiny_model, "--dataset", mrpc, "--max_train_samples", "32",
                      "--max_eval_samples", "24", "--eval_batch_size", "8", "--out", str(tmp_path), "--in_process"])
    data = json.loads(Path(out["json_path"]).read_text())
    assert set(data["arms"]) == set(bench.ARMS)
    for name, arm in data["arms"].items():
        assert "error" not in arm, (name, arm)
        assert arm["train_tokens_per_s"] > 0 and arm["train_steps"] == 2 and arm["peak_memory_bytes"] > 0
        if name != "dense":
            assert arm["eval_examples"] == 24 and arm["eval_examples_per_s"] > 0 and 0 <= arm["accuracy"] <= 1
    assert data["arms"]["dense"]["train_padding_efficiency"] == 1.0
    # The evaluation target on one model: both paths timed in every round, and the fast path's argmax is the
    # Trainer's predict() argmax on the same trained model (the Trainer is the oracle here)
    same = data["arms"][bench.SAME_MODEL_ARM]["same_model_eval"]
    assert {p: len(t) for p, t in same["seconds"].items()} == {"trainer": bench.SAME_MODEL_ROUNDS,
                                                                "ft": bench.SAME_MODEL_ROUNDS}
    assert same["seconds"]["trainer"][0] == data["arms"][bench.SAME_MODEL_ARM]["eval_seconds"]
    assert same["argmax_agreement"] == 1.0 and same["examples"] == 24
    assert same["ft_fast_path"]["eval_fast_path"] is True and same["ft_fast_path"]["eval_prefix_tokens"] > 0
    assert data["ratios"]["eval_examples_per_s_ft_over_trainer_predict_same_model"] == pytest.approx(
        min(same["seconds"]["trainer"]) / min(same["seconds"]["ft"]))
    assert not any("same_model_eval" in a for n, a in data["arms"].items() if n != bench.SAME_MODEL_ARM)
    for key, _ in bench.TARGETS.values():
        assert key in data["ratios"]
    assert data["machine"]["cpu_count"] and data["machine"]["packages"]["transformers"]
    md = Path(out["json_path"]).with_suffix(".md").read_text()
    for label in ("Trainer + PEFT, bf16 (random batches)", "Trainer + PEFT, bf16 (group_by_length)",
                  "Trainer + PEFT, float32 (random batches)", "Trainer + PEFT, float32 (group_by_length)",
                  "ft.py (defaults)", "dense limit"):
        assert label in md
    # the Trainer recipe as users write it computes in bf16; ft.py and the dense limit in what auto picks
    from qlora_cls.hardware import default_compute_dtype
    dtypes = {name: arm["compute_dtype"] for name, arm in data["arms"].items()}
    assert dtypes == {"trainer_default_bf16": "bfloat16", "trainer_grouped_bf16": "bfloat16",
                      "trainer_default": "float32", "trainer_grouped": "float32",
                      "ft": default_compute_dtype("cpu"), "dense": default_compute_dtype("cpu")}
    assert all("_bf16" in key or "dense" in key for key, _ in bench.TARGETS.values()
               if "_ft_" in key and "same_model" not in key)
    assert dtypes[bench.SAME_MODEL_ARM] == "bfloat16"  # the same-model targets are measured on a bf16 Trainer model
    assert "Evaluation on one model" in md
    assert md.count("| >= ") == len(bench.TARGETS)


@pytest.mark.slow
def test_optional_torch_dropout_arm_compares_loss_curves(tiny_model, mrpc, tmp_path):
    out = bench.main(["--steps", "3", "--model_dir", tiny_model, "--dataset", mrpc, "--max_train_samples", "32",
                      "--max_eval_samples", "16", "--eval_batch_size", "8", "--out", str(tmp_path), "--in_process",
                      "--arms", "ft,ft_torch_dropout"])
    fast, torch_dropout = (out["arms"][k]["loss_curve"] for k in ("ft", "ft_torch_dropout"))
    # Same seed and data: step 1 is identical (LoRA B starts at zero, so no dropout mask reaches the
    # output yet); later steps differ because the two dropouts draw different masks.
    assert fast[0] == torch_dropout[0] and fast != torch_dropout
    # 3 steps are one window: the ratio is |difference of the mean losses|, which is > 0 (the curves differ)
    # and at most the largest per-step difference (a mean moves less than its largest term)
    diff = out["ratios"]["loss_window_max_abs_diff_ft_vs_ft_torch_dropout"]
    assert 0 < diff <= max(abs(a - b) for a, b in zip(fast, torch_dropout))
    assert "train_tokens_per_s_ft_over_ft_torch_dropout" in out["ratios"]
    assert "Training loss, mean per 25 steps" in Path(out["json_path"]).with_suffix(".md").read_text()
    assert bench.window_means([1, 2, 3, 4, 5], 2) == [1.5, 3.5, 5]


def test_ratios_by_hand():
    """The ratio formulas on made-up arm results whose ratios are worked out by hand."""
    ft = {"train_tokens_per_s": 300.0, "train_examples_per_s": 12.0, "train_tokens_per_s_median_step": 310.0,
          "eval_examples_per_s": 90.0, "accuracy": 0.80, "f1": 0.85,
          "loss_curve": [1.0] * 25 + [0.5] * 25 + [0.2]}
    trainer = {"train_tokens_per_s": 200.0, "train_examples_per_s": 10.0, "train_tokens_per_s_median_step": 248.0,
               "eval_examples_per_s": 30.0, "accuracy": 0.75, "f1": 0.86}
    torch_dropout = {"train_tokens_per_s": 250.0, "train_examples_per_s": 10.0,
                     "loss_curve": [0.9] * 25 + [0.8] * 25 + [0.1]}
    r = bench.ratios({"ft": ft, "trainer_default_bf16": trainer, "ft_torch_dropout": torch_dropout})
    assert r["train_tokens_per_s_ft_over_trainer_default_bf16"] == pytest.approx(1.5)      # 300 / 200
    assert r["train_examples_per_s_ft_over_trainer_default_bf16"] == pytest.approx(1.2)    # 12 / 10
    assert r["train_tokens_per_s_median_step_ft_over_trainer_default_bf16"] == pytest.approx(1.25)  # 310 / 248
    assert r["eval_examples_per_s_ft_over_trainer_default_bf16"] == pytest.approx(3.0)     # 90 / 30
    assert r["accuracy_points_ft_minus_trainer_default_bf16"] == pytest.approx(5.0)        # 80 % - 75 %
    assert r["f1_points_ft_minus_trainer_default_bf16"] == pytest.approx(-1.0)             # 85 - 86
    assert r["train_tokens_per_s_ft_over_ft_torch_dropout"] == pytest.approx(1.2)          # 300 / 250
    # windows of 25 steps: |1.0 - 0.9| = 0.1, |0.5 - 0.8| = 0.3, |0.2 - 0.1| = 0.1 -> max 0.3
    assert r["loss_window_max_abs_diff_ft_vs_ft_torch_dropout"] == pytest.approx(0.3)
    assert not any("trainer_grouped" in k or "dense" in k for k in r)  # arms that did not run give no ratio
    assert not any("same_model" in k for k in r)  # no same-model comparison in these arms
    trainer["same_model_eval"] = {"trainer_examples_per_s": 8.0, "ft_examples_per_s": 18.0, "argmax_agreement": 0.5}
    r = bench.ratios({"trainer_default_bf16": trainer})
    assert r["eval_examples_per_s_ft_over_trainer_predict_same_model"] == pytest.approx(2.25)  # 18 / 8
    assert r["eval_argmax_agreement_ft_vs_trainer_predict_same_model"] == 0.5


def test_dense_batch_by_hand():
    """Rows of lengths 3 and 5 become two rows of 4 tokens: the short one cycled, the long one cut."""
    import torch
    ids = [[11, 12, 13], [21, 22, 23, 24, 25]]
    b = bench.dense_batch([0, 1], [3, 5], ids, [1, 0], "cpu")
    assert b["input_ids"].tolist() == [[11, 12, 13, 11], [21, 22, 23, 24]]
    assert b["attention_mask"].tolist() == [[1] * 4] * 2 and b["labels"].tolist() == [1, 0]
    assert b["input_ids"].dtype == torch.long

