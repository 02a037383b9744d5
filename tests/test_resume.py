"""Fault tolerance: kill -9 mid-epoch and resume == uninterrupted (1 and 2 processes), SIGTERM, non-finite
steps, refused resumes, and write failures that leave nothing a resume could trust."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, TWO_PROCESSES, accelerate_launch, tiny_args

FT = str(REPO / "ft.py")
# 48 examples / batch 8 = 6 steps per epoch: 12 steps span two epochs, checkpoints every 2 steps.
RUN_FLAGS = ("--max_steps", "12", "--checkpoint_every", "2", "--log_every", "1", "--max_eval_samples", "16")


def _env(**extra):
    return dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", **extra)


def _run(cmd, cwd, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*/progress.json"))


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line names this run (launcher and all workers)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start_and_kill(cmd, cwd, run: Path, after_step: int, env=None) -> None:
    """Start a run and SIGKILL it (all its processes) once a checkpoint at or after ``after_step`` exists."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        steps = _checkpoint_steps(run) if (run / "checkpoints").is_dir() else []
        if steps and steps[-1] >= after_step:
            break
        time.sleep(0.02)
    _kill_all(str(run))
    proc.wait(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be killed: " + proc.stderr[-2000:]
    assert not (run / "metrics.json").exists()


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-6, k
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    metric_keys = ("epoch", "step", "accuracy", "f1")
    assert [{k: e[k] for k in metric_keys} for e in ma["epochs"]] == [{k: e[k] for k in metric_keys} for e in mb["epochs"]]
    assert ma["best_epoch"] == mb["best_epoch"]
    # every optimizer step logged exactly once, with the same loss as the uninterrupted run
    la = [json.loads(x) for x in (a / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lb] == [e["step"] for e in la] == list(range(1, len(la) + 1))
    assert [e["loss"] for e in lb] == pytest.approx([e["loss"] for e in la], abs=1e-6)


@pytest.fixture(scope="module")
def reference_run(tiny_model, mrpc, tmp_path_factory) -> Path:
    """The uninterrupted run that interrupted-and-resumed runs must reproduce (one process)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _run([sys.executable, FT, *tiny_args(tiny_model, mrpc, run, *RUN_FLAGS)], run.parent)
    return run


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(reference_run, tiny_model, mrpc, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, FT, *tiny_args(tiny_model, mrpc, run, *RUN_FLAGS)]
    _start_and_kill(cmd, tmp_path, run, after_step=8)  # epoch 1 is 7..12: killed mid-epoch
    assert _checkpoint_steps(run)[-1] % 6 != 0
    proc = _run(cmd + ["--resume"], tmp_path)
    assert "resumed from checkpoint-" in proc.stderr
    _assert_same_run(reference_run, run)


@pytest.mark.slow
def test_sigkill_then_resume_on_two_processes(tiny_model, mrpc, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run([*accelerate_launch(*TWO_PROCESSES), FT, *tiny_args(tiny_model, mrpc, ref, *RUN_FLAGS, "--max_train_samples", "96")], tmp_path)
    cmd = [*accelerate_launch(*TWO_PROCESSES), FT, *tiny_args(tiny_model, mrpc, run, *RUN_FLAGS, "--max_train_samples", "96")]
    _start_and_kill(cmd, tmp_path, run, after_step=4)
    proc = _run(cmd + ["--resume"], tmp_path)
    assert "resumed from checkpoint-" in proc.stderr
    assert json.loads((run / "config.json").read_text())["environment"]["world_size"] == 2
    _assert_same_run(ref, run)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reference_run, tiny_model, mrpc, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, FT, *tiny_args(tiny_model, mrpc, run, *RUN_FLAGS)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal 15" in err
    # the checkpoint is at the step where the signal was handled (not an older periodic one)
    logged = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert _checkpoint_steps(run)[-1] == logged[-1] and not (run / "metrics.json").exists()
    _run(cmd + ["--resume"], tmp_path)
    _assert_same_run(reference_run, run)


@pytest.mark.slow
def test_resume_refuses_changed_settings_and_finished_runs(reference_run, tiny_model, mrpc, tmp_path, capsys):
    import ft
    with pytest.raises(SystemExit) as exc:  # finished: nothing to resume
        ft.main(tiny_args(tiny_model, mrpc, reference_run, *RUN_FLAGS, "--resume"))
    assert exc.value.code == 2 and "already finished" in capsys.readouterr().err
    run = tmp_path / "run"
    cmd = [sys.executable, FT, *tiny_args(tiny_model, mrpc, run, *RUN_FLAGS)]
    _start_and_kill(cmd, tmp_path, run, after_step=2)
    with pytest.raises(SystemExit) as exc:  # a different learning rate would mix two experiments
        ft.main(tiny_args(tiny_model, mrpc, run, *RUN_FLAGS, "--resume", "--lr", "1e-3"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--lr 0.0003 -> 0.001" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_nonfinite_step_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(tiny_model, mrpc, tmp_path, capsys):
    import ft
    run = tmp_path / "run"
    # lr 1e30 (torch AdamW: deterministic) blows the weights up after the first real step.
    args = tiny_args(tiny_model, mrpc, run, "--max_steps", "6", "--checkpoint_every", "1", "--log_every", "1",
                     "--lr", "1e30", "--optim", "adamw_torch")
    with pytest.raises(SystemExit) as exc:
        ft.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 1
    line = [x for x in err.splitlines() if "ft.py: error:" in x]
    assert len(line) == 1 and "non-finite loss/gradient at optimizer step 3" in line[0]
    assert _checkpoint_steps(run) == [2]  # the last finite state; nothing past the bad step
    assert not (run / "metrics.json").exists()

    skipped = tmp_path / "skipped"
    summary = ft.main(tiny_args(tiny_model, mrpc, skipped, "--max_steps", "6", "--log_every", "1", "--lr", "1e30",
                                "--optim", "adamw_torch", "--skip_nonfinite"))
    assert summary["skipped_steps"] == 4
    assert json.loads((skipped / "metrics.json").read_text())["skipped_steps"] == 4


def test_unwritable_results_path_is_one_clear_error(tiny_model, mrpc, tmp_path, capsys):
    import ft
    blocker = tmp_path / "a-file"
    blocker.write_text("user data\n")
    with pytest.raises(SystemExit) as exc:
        ft.main(tiny_args(tiny_model, mrpc, blocker / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "cannot create --results_path" in err[0]
    assert blocker.read_text() == "user data\n"


@pytest.mark.slow
def test_full_disk_leaves_no_truncated_file_and_resume_recovers(reference_run, tiny_model, mrpc, tmp_path,
                                                               monkeypatch, capsys, request):
    """The disk fills up while metrics.json is written: clear error, no partial metrics.json, resumable."""
    import torch

    import ft
    real_fsync = os.fsync
    # One thread, as the reference run (OMP_NUM_THREADS=1): bf16 matmuls on AMX sum in a thread-dependent
    # order, so runs on different thread counts differ by ~1e-6 although both are exact resumes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def fsync(fd):
        if "metrics.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    run = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SystemExit) as exc:
        ft.main(tiny_args(tiny_model, mrpc, run, *RUN_FLAGS))
    err = [x for x in capsys.readouterr().err.splitlines() if "ft.py: error:" in x]
    assert exc.value.code == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert not (run / "metrics.json").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    ft.main(tiny_args(tiny_model, mrpc, run, *RUN_FLAGS, "--resume"))
    _assert_same_run(reference_run, run)


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    from qlora_cls import checkpoint
    root = tmp_path / checkpoint.DIR
    (root / "checkpoint-00000002").mkdir(parents=True)
    (root / "checkpoint-00000002" / "progress.json").write_text("{}")
    (root / "checkpoint-00000004").mkdir()  # no progress.json: written by someone else / damaged
    (root / ".checkpoint-00000006.abc.tmp").mkdir()  # a save that was killed
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-00000002"]


def test_truncate_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    from qlora_cls.checkpoint import truncate_log
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    truncate_log(log, 4)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_run_saved_before_a_field_existed_resumes_with_the_old_behaviour(tmp_path):
    """A config.json without fast_cpu_dropout came from torch's dropout: resuming needs --fast_cpu_dropout false."""
    from dataclasses import asdict

    from qlora_cls.checkpoint import check_resumable
    from qlora_cls.config import TrainConfig
    from qlora_cls.errors import UsageError

    old = asdict(TrainConfig())
    del old["fast_cpu_dropout"]
    (tmp_path / "config.json").write_text(json.dumps({"config": old}))
    check_resumable(tmp_path, asdict(TrainConfig(fast_cpu_dropout=False)))
    with pytest.raises(UsageError, match="fast_cpu_dropout False -> True"):
        check_resumable(tmp_path, asdict(TrainConfig()))


def test_lora_targets_are_compared_as_resolved(tmp_path):
    """A run saved with --target_modules q_proj v_proj (the old default) resumes under the attention-qv
    preset, which resolves to those layers on a Llama; a preset meaning other layers is refused."""
    from dataclasses import asdict

    from qlora_cls.checkpoint import check_resumable
    from qlora_cls.config import TrainConfig
    from qlora_cls.errors import UsageError

    old = asdict(TrainConfig(target_modules=["q_proj", "v_proj"]))
    (tmp_path / "config.json").write_text(json.dumps({"config": old}))
    check_resumable(tmp_path, asdict(TrainConfig()), ("q_proj", "v_proj"))
    with pytest.raises(UsageError, match="target_modules"):
        check_resumable(tmp_path, asdict(TrainConfig(target_modules=["attention"])),
                        ("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.mark.slow
def test_run_started_with_the_old_cpu_defaults_resumes_with_a_bare_command(tiny_model, mrpc, tmp_path):
    """Before auto picked bf16 (AMX CPUs) and no checkpointing on CPU, a bare run saved float32 + checkpointing:
    resuming it with the same bare command keeps those (auto takes the saved values) instead of refusing."""
    import ft
    run = tmp_path / "run"
    old_defaults = ("--bnb_4bit_compute_dtype", "float32", "--gradient_checkpointing", "true")
    _start_and_kill([sys.executable, FT, *tiny_args(tiny_model, mrpc, run, *RUN_FLAGS, *old_defaults)], tmp_path, run,
                    after_step=2)
    ft.main(tiny_args(tiny_model, mrpc, run, *RUN_FLAGS, "--resume"))
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["bnb_4bit_compute_dtype"], saved["gradient_checkpointing"]) == ("float32", True)
    assert [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()] == list(range(1, 13))
