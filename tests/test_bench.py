"""bench/bench.py end to end on the tiny model: every arm runs, JSON and Markdown carry all arms and ratios."""
import json
from pathlib import Path

from bench import bench


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
    assert all("_bf16" in key or "dense" in key for key, _ in bench.TARGETS.values() if "_ft_" in key)
    assert md.count("| >= ") == len(bench.TARGETS)


def test_optional_torch_dropout_arm_compares_loss_curves(tiny_model, mrpc, tmp_path):
    out = bench.main(["--steps", "3", "--model_dir", tiny_model, "--dataset", mrpc, "--max_train_samples", "32",
                      "--max_eval_samples", "16", "--eval_batch_size", "8", "--out", str(tmp_path), "--in_process",
                      "--arms", "ft,ft_torch_dropout"])
    fast, torch_dropout = (out["arms"][k]["loss_curve"] for k in ("ft", "ft_torch_dropout"))
    # Same seed and data: step 1 is identical (LoRA B starts at zero, so no dropout mask reaches the
    # output yet); later steps differ because the two dropouts draw different masks.
    assert fast[0] == torch_dropout[0] and fast != torch_dropout
    diff = out["ratios"]["loss_window_max_abs_diff_ft_vs_ft_torch_dropout"]
    assert diff == abs(sum(fast) / 3 - sum(torch_dropout) / 3)
    assert "train_tokens_per_s_ft_over_ft_torch_dropout" in out["ratios"]
    assert "Training loss, mean per 25 steps" in Path(out["json_path"]).with_suffix(".md").read_text()
    assert bench.window_means([1, 2, 3, 4, 5], 2) == [1.5, 3.5, 5]
