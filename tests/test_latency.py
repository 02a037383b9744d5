"""bench/latency.py and bench/eval_bench.py end to end on the tiny model (figures are not asserted: they
are measurements; the structure, call counts and the equality of the evaluation paths are)."""
import json
from pathlib import Path

import pytest

import ft
from bench import eval_bench, latency
from conftest import tiny_args


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert latency.percentile(values, 50) == 50 and latency.percentile(values, 95) == 95
    assert latency.percentile([3.0, 1.0, 2.0], 50) == 2.0 and latency.percentile([5.0], 95) == 5.0


@pytest.mark.slow
def test_latency_table_for_base_adapter_merged(tiny_model, mrpc, tmp_path):
    run = tmp_path / "run"
    ft.main(tiny_args(tiny_model, mrpc, run))
    out = latency.main(["--results_path", str(run), "--calls", "100", "--warmup", "2", "--examples", "16",
                        "--out", str(tmp_path / "res"), "--bottleneck_results_path", str(run)])
    data = json.loads(Path(out["json_path"]).read_text())
    assert set(data["arms"]) == {"base", "adapter", "merged", "merged_bf16"}
    for arm in data["arms"].values():
        for b in (1, 8):
            cell = arm[f"batch_{b}"]
            assert cell["calls"] == 100 and cell["batch"] == b
            assert 0 < cell["median_ms"] <= cell["p95_ms"]
            assert cell["median_ms_per_example"] == pytest.approx(cell["median_ms"] / b)
    assert "method 'qlora', not 'adapter'" in data["notes"]["bottleneck"]
    md = Path(out["json_path"]).with_suffix(".md").read_text()
    assert "merged model (merge.py, float32)" in md and "bottleneck adapter" in md and "skipped" in md
    assert not any(p.name.startswith(".") for p in run.iterdir())  # the merge went to a temporary folder


@pytest.mark.slow
def test_latency_trains_a_bottleneck_arm_of_at_most_the_runs_trainable_size(tiny_model, mrpc, tmp_path):
    import re
    run = tmp_path / "run"
    ft.main(tiny_args(tiny_model, mrpc, run))
    lora = json.loads((run / "metrics.json").read_text())["parameters"]["trainable"]
    out = latency.main(["--results_path", str(run), "--calls", "100", "--warmup", "1", "--examples", "8",
                        "--train_steps", "2", "--dataset", mrpc, "--out", str(tmp_path / "res")])
    data = json.loads(Path(out["json_path"]).read_text())
    assert set(data["arms"]) == {"base", "adapter", "merged", "merged_bf16", "bottleneck"}
    note = data["notes"]["bottleneck"]
    counts = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", note.split("(")[0])]
    assert counts[1] == lora and 0 < counts[0] <= lora and "trained here, 2 steps" in note
    assert data["arms"]["bottleneck"]["batch_8"]["calls"] == 100


def test_latency_refuses_fewer_than_100_calls(capsys):
    with pytest.raises(SystemExit) as exc:
        latency.parse_args(["--calls", "10"])
    assert exc.value.code == 2 and "--calls must be >= 100" in capsys.readouterr().err


def test_eval_bench_compares_the_paths_on_one_model(tiny_model, mrpc, tmp_path):
    out = eval_bench.main(["--model_dir", tiny_model, "--dataset", mrpc, "--max_eval_samples", "24",
                           "--eval_batch_size", "8", "--out", str(tmp_path), "--rounds", "2"])
    arms = out["arms"]
    assert set(arms) == {"trainer", "plain", "fast", "fast_stream", "fast_unfused"}
    for name, arm in arms.items():
        # the stream in bf16 (where auto picks bf16) rounds more: tests/test_fast_eval.py bounds it
        assert arm["argmax_equal_to_plain"] and arm["max_abs_logit_diff_vs_plain"] <= (
            1e-2 if name == "fast_stream" else 1e-5)
        assert len(arm["rounds"]) == 2 and arm["accuracy"] == arms["plain"]["accuracy"]
    assert arms["fast"]["eval_prefix_tokens"] > 0 and arms["fast"]["eval_dequantized"] is True
    # the tiny Llama's two gated MLPs are fused in the default arm only
    assert arms["fast"]["eval_fused_gated_mlps"] == 2 and "eval_fused_gated_mlps" not in arms["fast_unfused"]
    assert arms["fast_unfused"]["eval_dequantized_layers"] == arms["fast"]["eval_dequantized_layers"] > 0
    assert arms["trainer"]["padding_efficiency"] < arms["plain"]["padding_efficiency"]  # random vs length-sorted
    assert out["ratios"]["fast_over_trainer"] == pytest.approx(arms["fast"]["examples_per_s"]
                                                               / arms["trainer"]["examples_per_s"])
    assert "fast / Trainer.predict()" in Path(out["json_path"]).with_suffix(".md").read_text()
