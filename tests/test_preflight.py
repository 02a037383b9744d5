"""Launch set-ups known to break are refused before any weights load, with one line saying what to do."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, tiny_args
from qlora_cls.config import TrainConfig
from qlora_cls.errors import UsageError
from qlora_cls.preflight import check_launch_and_resolve


def fake_accelerator(dist="DistributedType.NO", stage=None, mixed_precision="no", processes=1, local_index=0,
                     device="cpu"):
    plugin = None
    if stage is not None:
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"train_batch_size": "auto"})
    return SimpleNamespace(distributed_type=dist, mixed_precision=mixed_precision, num_processes=processes,
                           device=torch.device(device),
                           state=SimpleNamespace(deepspeed_plugin=plugin, local_process_index=local_index))


def cfg(**kw):
    return TrainConfig(**{"bnb_4bit_compute_dtype": "float32", **kw})


def refusal(config, accelerator) -> str:
    with pytest.raises(UsageError) as exc:
        check_launch_and_resolve(config, accelerator)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_8bit_optimizer_with_fsdp():
    msg = refusal(cfg(optim="adamw_8bit"), fake_accelerator("DistributedType.FSDP"))
    assert "does not work with FSDP" in msg and "--optim adamw_torch" in msg
    assert check_launch_and_resolve(cfg(optim="adamw_torch"), fake_accelerator("DistributedType.FSDP")) is False


def test_zero3_with_4bit_storage_unlike_compute_dtype():
    msg = refusal(cfg(), fake_accelerator("DistributedType.DEEPSPEED", stage=3))
    assert "--bnb_4bit_quant_storage float32" in msg
    assert check_launch_and_resolve(cfg(bnb_4bit_quant_storage="float32"), fake_accelerator("DistributedType.DEEPSPEED", stage=3))
    # ZeRO-2 keeps whole weights per process: uint8 storage is fine there
    assert check_launch_and_resolve(cfg(), fake_accelerator("DistributedType.DEEPSPEED", stage=2)) is False


def test_no_device_map_under_zero3():
    from qlora_cls.pipeline import device_map_for
    accelerator = fake_accelerator()
    assert device_map_for(accelerator, zero3=True) is None
    assert device_map_for(accelerator, zero3=False) == {"": "cpu"}


def test_fp16_compute_with_bf16_mixed_precision_is_refused_and_fp16_warns(caplog):
    msg = refusal(cfg(bnb_4bit_compute_dtype="float16"), fake_accelerator(mixed_precision="bf16"))
    assert "--bnb_4bit_compute_dtype bfloat16" in msg
    with caplog.at_level("WARNING"):
        check_launch_and_resolve(cfg(bnb_4bit_compute_dtype="float16"), fake_accelerator())
    assert "unstable for QLoRA" in caplog.text


def test_bf16_compute_on_a_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    msg = refusal(cfg(bnb_4bit_compute_dtype="bfloat16"), fake_accelerator())
    assert "bf16 support" in msg


def test_more_processes_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    msg = refusal(cfg(), fake_accelerator("DistributedType.MULTI_GPU", processes=4, local_index=3, device="cuda"))
    assert "only 2 GPUs" in msg and "--num_processes 2" in msg


def test_launcher_and_accelerate_disagree_on_the_process_count(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    msg = refusal(cfg(), fake_accelerator("DistributedType.DEEPSPEED", stage=2, processes=1))
    assert "started 2 processes but accelerate set up 1" in msg


def test_global_batch_size_must_divide_by_processes_times_accumulation(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    msg = refusal(cfg(global_batch_size=30, gradient_accumulation_steps=4), fake_accelerator(processes=2))
    assert "does not divide by 2 processes x 4 accumulation steps = 8" in msg
    ok = cfg(global_batch_size=32, gradient_accumulation_steps=4)
    check_launch_and_resolve(ok, fake_accelerator(processes=2))
    assert ok.batch_size == 4


def test_skip_nonfinite_is_refused_under_deepspeed():
    msg = refusal(cfg(skip_nonfinite=True), fake_accelerator("DistributedType.DEEPSPEED", stage=2))
    assert "--skip_nonfinite does not work under DeepSpeed" in msg


def test_refusals_come_before_any_weights_load(tiny_model, mrpc, tmp_path, capsys, monkeypatch):
    """As a user would hit them: ft.py exits 2 with one line, no run folder, no model loaded."""
    import ft
    from qlora_cls import pipeline

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded before the pre-flight check")

    monkeypatch.setattr(pipeline, "load_base_model", no_loading)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        ft.main(tiny_args(tiny_model, mrpc, run, "--global_batch_size", "10", "--gradient_accumulation_steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "does not divide" in err[0], err
    assert not run.exists()
    # mixed precision is fixed per process by accelerate: a fresh process for this one
    proc = subprocess.run([sys.executable, str(REPO / "ft.py"), *tiny_args(tiny_model, mrpc, run),
                           "--mixed_precision", "bf16", "--bnb_4bit_compute_dtype", "float16"],
                          capture_output=True, text=True, timeout=300)
    err = [x for x in proc.stderr.splitlines() if "ft.py: error" in x]
    assert proc.returncode == 2 and len(err) == 1 and "mixes two half formats" in err[0], proc.stderr[-2000:]
    assert not run.exists() and "Loading weights" not in proc.stderr
