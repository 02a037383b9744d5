"""Step-wise evaluation (--eval_every), best-checkpoint selection over every evaluation, and the
run-level figures metrics.json gained with it: trained tokens, seconds per epoch, adapter size, latency."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import tiny_args


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def test_eval_every_evaluates_at_the_named_steps_and_selects_the_best_of_all(tiny_model, mrpc, tmp_path):
    import eval as eval_py
    import ft
    run = tmp_path / "run"
    # 48 examples / batch 8 = 6 steps per epoch: 10 steps with --eval_every 3 evaluate at steps 3 (step),
    # 6 (end of epoch 0), 9 (step) and 10 (the last step): worked out by hand from the flags.
    ft.main(tiny_args(tiny_model, mrpc, run, "--max_steps", "10", "--eval_every", "3", "--lr", "3e-3",
                      "--latency_calls", "3"))
    m = _metrics(run)
    assert [(e["step"], e["epoch"], e["trigger"]) for e in m["evaluations"]] == [
        (3, 0, "step"), (6, 0, "epoch"), (9, 1, "step"), (10, 1, "epoch")]
    assert [e["step"] for e in m["epochs"]] == [6, 10]
    assert m["final"]["step"] == 10
    # The best is the first evaluation with the highest accuracy, whichever cadence produced it.
    accuracies = [e["accuracy"] for e in m["evaluations"]]
    best = m["evaluations"][int(np.argmax(accuracies))]
    assert m["best_step"] == best["step"] and m["best_epoch"] == best["epoch"]
    if best["step"] != 10:
        # adapter_best/ holds the weights of that evaluation: re-evaluated from disk, the same score.
        assert m["has_adapter_best"]
        again = eval_py.main(["--results_path", str(run), "--adapter", "adapter_best",
                              "--output_dir", str(tmp_path / "best")])
        assert again["metrics"]["accuracy"] == pytest.approx(best["accuracy"], abs=1e-9)
    else:
        assert not m["has_adapter_best"]
    # Run-level figures: 10 steps of 6 per epoch; adapter size as the files on disk say.
    assert m["epochs_trained"] == pytest.approx(10 / 6)
    assert m["train_seconds_per_epoch"] == pytest.approx(m["train_seconds"] / (10 / 6))
    assert m["train_tokens_per_s"] == pytest.approx(m["train_tokens"] / m["train_seconds"])
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run / "adapter") for f in fs
                  if f != "README.md")
    assert m["adapter_bytes"] == on_disk > 0
    assert set(m["latency"]) == {"batch_1", "batch_8"}
    assert all(v["calls"] == 3 and 0 < v["median_ms"] <= v["p95_ms"] for v in m["latency"].values())


def test_eval_every_zero_is_per_epoch_only_and_latency_can_be_skipped(tiny_model, mrpc, tmp_path):
    import ft
    run = tmp_path / "run"
    ft.main(tiny_args(tiny_model, mrpc, run, "--max_steps", "12", "--latency_calls", "0"))
    m = _metrics(run)
    assert [(e["step"], e["trigger"]) for e in m["evaluations"]] == [(6, "epoch"), (12, "epoch")]
    assert m["evaluations"] == m["epochs"] and m["latency"] is None


def test_eval_every_bad_value_is_one_line(tmp_path, capsys):
    import ft
    with pytest.raises(SystemExit) as exc:
        ft.main(["--eval_every", "-2", "--results_path", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ft.py: error: --eval_every must be >= 0 (0 = after each epoch only), got -2"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("world,accum,grouped", [(1, 1, True), (1, 1, False), (2, 1, True), (2, 2, False)])
def test_tokens_trained_counts_every_example_once_per_epoch(world, accum, grouped):
    from qlora_cls.batching import LengthGroupedBatchSampler, tokens_trained
    lengths = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]  # 68 tokens
    sampler = LengthGroupedBatchSampler(lengths, 2, 7, world * accum, grouped)
    per_epoch = len(sampler) // (world * accum)
    # Whole epochs: every example is trained on exactly once per epoch, whatever the order and process count.
    assert tokens_trained(sampler, world, accum, per_epoch) == 68
    assert tokens_trained(sampler, world, accum, 3 * per_epoch) == 3 * 68
    part = tokens_trained(sampler, world, accum, per_epoch + 1)
    assert 68 < part < 2 * 68


def test_latency_summary_by_hand():
    from qlora_cls.latency import summarize
    s = summarize([0.004, 0.001, 0.003, 0.002], batch_size=2)
    # median of 1, 2, 3, 4 ms = 2.5; p95, nearest rank: ceil(0.95 * 4) = the 4th smallest = 4 ms
    assert s == pytest.approx({"median_ms": 2.5, "p95_ms": 4.0, "calls": 4, "median_ms_per_example": 1.25})


def test_latency_keeps_training_mode_and_lora_gradients(tiny_model):
    """Timing the training model in inference mode must not trip the CPU repack trap (modeling docstring)."""
    from accelerate import Accelerator
    from conftest import tiny_lora_training_model
    from qlora_cls.data import TokenizedSplit
    from qlora_cls.latency import measure_latency

    model, tok = tiny_lora_training_model(tiny_model)
    texts = [f"example number {i} " * (1 + i % 3) for i in range(9)]
    ids = [tok(t)["input_ids"] for t in texts]
    rows = TokenizedSplit({"input_ids": ids, "labels": [i % 2 for i in range(9)], "length": [len(x) for x in ids],
                    "idx": list(range(9))}, tok, False)
    batch = {k: v for k, v in rows([0, 5]).items()}

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    first = grads()
    result = measure_latency(model, rows, Accelerator(cpu=True), calls=4)
    assert model.training  # handed back as it was
    assert set(result) == {"batch_1", "batch_8"} and result["batch_8"]["calls"] == 4
    second = grads()
    assert all(first[n].abs().sum() > 0 for n in first if "lora_A" in n)
    for n in first:
        torch.testing.assert_close(second[n], first[n], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_killed_run_with_step_evaluations_resumes_to_the_same_evaluations(tiny_model, mrpc, tmp_path):
    import sys
    from test_resume import FT, RUN_FLAGS, _assert_same_run, _checkpoint_steps, _run, _start_and_kill
    flags = (*RUN_FLAGS, "--eval_every", "4", "--lr", "3e-3")
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run([sys.executable, FT, *tiny_args(tiny_model, mrpc, ref, *flags)], tmp_path)
    cmd = [sys.executable, FT, *tiny_args(tiny_model, mrpc, run, *flags)]
    _start_and_kill(cmd, tmp_path, run, after_step=8)  # after the step-8 evaluation, mid-epoch 1
    assert _checkpoint_steps(run)[-1] % 6 != 0
    assert "resumed from checkpoint-" in _run(cmd + ["--resume"], tmp_path).stderr
    _assert_same_run(ref, run)
    ma, mb = _metrics(ref), _metrics(run)
    keys = ("step", "trigger", "accuracy", "f1")
    assert [(4, "step"), (6, "epoch"), (8, "step"), (12, "epoch")] == [(e["step"], e["trigger"]) for e in mb["evaluations"]]
    assert [{k: e[k] for k in keys} for e in ma["evaluations"]] == [{k: e[k] for k in keys} for e in mb["evaluations"]]
    assert (ma["best_step"], ma["has_adapter_best"]) == (mb["best_step"], mb["has_adapter_best"])
