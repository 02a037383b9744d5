"""Real DeepSpeed runs on the CPU (DeepSpeed's CPU accelerator, one process) through the shipped configs."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, accelerate_launch, tiny_args
from test_resume import RUN_FLAGS, _assert_same_run, _start_and_kill

pytestmark = pytest.mark.slow  # real training runs of a minute or more (make test-quick leaves them out)
# deepspeed is a requirement: without it the session stops in one line (conftest.py), it is never skipped.


def launch(config: str) -> list[str]:
    # The shipped config names the DeepSpeed JSON relative to the repository root: launched from there.
    return [*accelerate_launch("--config_file", str(REPO / "accelerate_configs" / config)),
            "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "ft.py")]


def ds_env():
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # that would switch DeepSpeed off
    return dict(env, OMP_NUM_THREADS="1")


def run(cmd, check=True):
    proc = subprocess.run(cmd, cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_zero2_trains_resumes_after_kill_and_saves_an_adapter_eval_loads(tiny_model, mrpc, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run(launch("deepspeed_zero2.yaml") + tiny_args(tiny_model, mrpc, ref, *RUN_FLAGS))
    resolved = json.loads((ref / "config.json").read_text())["resolved"]
    assert resolved["distributed_type"].endswith("DEEPSPEED")
    ckpt = sorted((ref / "checkpoints").glob("checkpoint-*"))[-1]
    assert (ckpt / "engine").is_dir()  # the engine's own state (fp32 master weights, optimizer)

    cmd = launch("deepspeed_zero2.yaml") + tiny_args(tiny_model, mrpc, killed, *RUN_FLAGS)
    _start_and_kill(cmd, REPO, killed, after_step=8, env=ds_env())
    proc = run(cmd + ["--resume"])
    assert "resumed from checkpoint-" in proc.stderr
    _assert_same_run(ref, killed)

    # eval.py (no DeepSpeed) rebuilds the model from config.json and reproduces the final metrics
    import eval as eval_entry
    eval_entry.main(["--results_path", str(ref), "--output_dir", str(tmp_path / "ev"), "--max_eval_samples", "16"])
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    final = json.loads((ref / "metrics.json").read_text())["final"]
    assert again == {k: final[k] for k in again}


def test_zero3_with_4bit_refuses_uint8_storage_then_trains_with_matching_storage(tiny_model, mrpc, tmp_path):
    from qlora_cls.hardware import default_compute_dtype
    compute = default_compute_dtype("cpu")  # what auto resolves to here: bf16 with AMX-BF16, else float32
    bad = run(launch("deepspeed_zero3.yaml") + tiny_args(tiny_model, mrpc, tmp_path / "bad"), check=False)
    err = [x for x in bad.stderr.splitlines() if "ft.py: error" in x]
    assert bad.returncode != 0 and len(err) == 1 and f"--bnb_4bit_quant_storage {compute}" in err[0]
    assert "Loading weights" not in bad.stderr and not (tmp_path / "bad").exists()

    out = tmp_path / "z3"
    run(launch("deepspeed_zero3.yaml") + tiny_args(tiny_model, mrpc, out, "--bnb_4bit_quant_storage", compute))
    from safetensors.torch import load_file
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    # LoRA A/B of q,v in both layers + the head, gathered from the ZeRO-3 shards at full shape
    assert len(adapter) == 9 and adapter["base_model.model.score.weight"].shape == (2, 64)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # it trained
    import eval as eval_entry
    eval_entry.main(["--results_path", str(out), "--output_dir", str(tmp_path / "ev3"), "--max_eval_samples", "37"])
    again = json.loads((tmp_path / "ev3" / "metrics.json").read_text())["metrics"]
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert again == {k: final[k] for k in again}
