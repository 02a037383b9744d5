"""The real embedded SmolLM2-135M (4-bit NF4) on 64 real MRPC examples: the training loss falls."""
import json

import pytest

import ft

pytestmark = pytest.mark.slow  # real training runs of a minute or more (make test-quick skips them)


def test_real_model_loss_falls(mrpc, tmp_path):
    run = tmp_path / "smol"
    ft.main(["--dataset", mrpc, "--results_path", str(run), "--max_train_samples", "64", "--max_eval_samples", "16",
             "--max_steps", "20", "--log_every", "5", "--gradient_checkpointing", "false", "--seed", "0",
             "--latency_calls", "0"])
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [5, 10, 15, 20]
    assert log[-1]["loss"] < log[0]["loss"], [e["loss"] for e in log]
    assert all(e["grad_norm"] > 0 for e in log)
