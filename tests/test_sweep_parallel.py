"""sweep.py --executor local (submitit): points at once on their own cores, the same results as the sequential
sweep, a killed sweep leaves no process and resumes; bad scheduling input; the Slurm submission it generates."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import report
import sweep
from conftest import REPO, sweep_flags
from test_sweep import POINTS, _usage_error


def _proc_stat(pid: str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose command line contains ``text``: an oracle independent of the sweep's
    own bookkeeping. A finished child can linger as a zombie where PID 1 reaps late; zombies do not count."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = _proc_stat(entry.name)[0]
        except (OSError, IndexError):
            continue
        if text in cmd and state not in ("Z", "X"):
            out.append((int(entry.name), cmd))
    return out


def wait_until_gone(text: str, seconds: float = 90) -> list:
    deadline = time.monotonic() + seconds
    left = processes_mentioning(text)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_mentioning(text)
    return left


def _ft_processes(sweep_dir: Path) -> dict[int, tuple[str, str]]:
    """ft.py processes of this sweep: pid -> (allowed cores, OMP_NUM_THREADS), read from /proc."""
    out = {}
    for pid, cmd in processes_mentioning(str(sweep_dir)):
        if "ft.py" not in cmd or "accelerate.commands.launch" in cmd:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        cores = [line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list")]
        omp = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"OMP_NUM_THREADS=")]
        out[pid] = (cores[0] if cores else "", omp[0] if omp else "")
    return out


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_local_parallel_sweep_gives_the_sequential_results_on_separate_cores(tiny_sweep, tiny_model, mrpc, tmp_path):
    """The same 2 prompts x 2 seeds as the sequential tiny_sweep, two points at once through `accelerate launch`:
    every point's metrics and losses equal the sequential sweep's; while it ran, two ft.py processes trained at
    the same time, each pinned to its own core with OMP_NUM_THREADS=1 (read from /proc, not from the sweep)."""
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "this test needs 2 CPU cores (it runs two points at once, one core each)"
    d = tmp_path / "par"
    args = ["--sweep_dir", str(d), "--executor", "local", "--parallel", "2", "--eval_prompts", "none", "perfect",
            "--prompt", "none", "perfect", "--seed", "1", "2", *sweep_flags(tiny_model, mrpc)]
    seen: dict[int, tuple[str, str]] = {}
    together = 0
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            now = _ft_processes(d)
            seen.update(now)
            together = max(together, len(now))
            time.sleep(0.2)
    out = (tmp_path / "sweep.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert together == 2, f"never saw two points training at once: {seen}"
    assert {c for c, _ in seen.values()} == {str(cores[0]), str(cores[1])}, seen  # one core each, both used
    assert {omp for _, omp in seen.values()} == {"1"}, seen
    manifest = json.loads((d / "sweep.json").read_text())["points"]
    assert list(manifest) == POINTS
    seq = tiny_sweep["dir"]
    for name in POINTS:
        entry = manifest[name]
        assert entry["status"] == "finished" and entry["executor"] == "local" and int(entry["job_id"]) > 0
        mine, theirs = (json.loads((x / name / "metrics.json").read_text())["final"] for x in (d, seq))
        for k in ("accuracy", "f1"):
            assert mine[k] == pytest.approx(theirs[k], abs=1e-9), (name, k)
        assert _steps(d / name) == [2, 4, 6]
        assert _losses(d / name) == pytest.approx(_losses(seq / name), rel=1e-4, abs=1e-6), name
        cmd = [line for line in (d / "logs" / f"{name}.log").read_text().splitlines() if line.startswith("### ")]
        assert len(cmd) == 1 and "accelerate.commands.launch" in cmd[0] and "--resume" not in cmd[0]
        for prompt in ("none", "perfect"):  # every adapter under every eval prompt, as the sequential sweep
            e = json.loads((d / name / "evals" / f"validation-{prompt}" / "metrics.json").read_text())
            s = json.loads((seq / name / "evals" / f"validation-{prompt}" / "metrics.json").read_text())
            assert e["examples"] == 37 and e["metrics"] == pytest.approx(s["metrics"], abs=1e-9)
    for prompt in ("none", "perfect"):  # the base model once per prompt, though two points could write it
        e = json.loads((d / "base" / f"validation-{prompt}-base" / "metrics.json").read_text())
        s = json.loads((seq / "base" / f"validation-{prompt}-base" / "metrics.json").read_text())
        assert e["base_only"] and e["metrics"] == pytest.approx(s["metrics"], abs=1e-9)
    # report.py reads the parallel sweep as it reads a sequential one
    rows = report.main([str(d)])
    table = (rows["out"] / "report.md").read_text()
    assert "prompt=none" in table and "prompt=perfect" in table
    assert not processes_mentioning(str(d))
    # a re-run finds everything done and starts nothing
    again = subprocess.run([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4, again.stdout[-2000:]


def _kill_test_args(d: Path, tiny_model: str, mrpc: str) -> list[str]:
    return ["--sweep_dir", str(d), "--executor", "local", "--parallel", "2", "--launcher", "python",
            "--eval_prompts", "--base_eval", "false", "--seed", "1", "2", "--model_dir", tiny_model,
            "--dataset", mrpc, "--max_train_samples", "400", "--max_eval_samples", "16", "--max_steps", "120",
            "--log_every", "2"]


def _start_and_wait_for_training(args, tmp_path, d, name):
    """Start the sweep; return once both points train. seed=1 is held at step 2 until a SIGTERM reaches it
    (tests/hooks/sitecustomize.py), so it cannot finish before seed=2 has started on a slow machine."""
    log = open(tmp_path / f"{name}.log", "w")
    marker = tmp_path / "seed1-at-step-2"
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests" / "hooks"), QLORA_TEST_STOP_POINT="seed=1",
               QLORA_TEST_STOP_STEP="2", QLORA_TEST_STOP_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (
            marker.exists() and (d / "seed=2" / "train_log.jsonl").is_file()):
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
    return proc, log


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killed_local_sweep_leaves_no_process_and_resumes_every_step_once(tiny_model, mrpc, tmp_path, how):
    """Two points training at once; the sweep gets SIGTERM (as from a cluster or Ctrl-C) or SIGKILL: both points
    checkpoint, no process of the sweep is left (scanning /proc), and the same command resumes both from their
    checkpoints, each step logged once."""
    d = tmp_path / "s"
    args = _kill_test_args(d, tiny_model, mrpc)
    proc, log = _start_and_wait_for_training(args, tmp_path, d, "first")
    proc.send_signal(getattr(signal, how))
    code = proc.wait(timeout=300)
    log.close()
    first = (tmp_path / "first.log").read_text()
    left = wait_until_gone(str(d))
    assert not left, f"processes outlived the sweep: {left}"
    manifest = json.loads((d / "sweep.json").read_text())["points"]
    if how == "SIGTERM":
        assert code == 128 + signal.SIGTERM, first[-3000:]
        assert "interrupted" in first
        assert all(p["status"] == "interrupted" for p in manifest.values()), manifest
    else:
        assert code == -signal.SIGKILL
        assert all(p["status"] in ("queued", "running") for p in manifest.values())  # as the killed sweep left it
    for s in (1, 2):
        assert any((d / f"seed={s}" / "checkpoints").glob("checkpoint-*/progress.json")), s  # written on SIGTERM
        assert not (d / f"seed={s}" / "metrics.json").exists()
    second = subprocess.run([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    manifest = json.loads((d / "sweep.json").read_text())["points"]
    for s in (1, 2):
        run = d / f"seed={s}"
        assert manifest[f"seed={s}"]["status"] == "finished"
        text = (d / "logs" / f"seed={s}.log").read_text()
        cmds = [line for line in text.splitlines() if line.startswith("### ")]
        assert len(cmds) == 2 and "--resume" not in cmds[0] and cmds[1].endswith("--resume")  # started once
        assert "resumed from checkpoint-" in text
        assert _steps(run) == list(range(2, 121, 2))  # every step logged once, none lost or repeated
    assert not processes_mentioning(str(d))


# -- bad input: one line, exit 2, nothing created ---------------------------------------------------------
def test_bad_scheduling_input_fails_before_anything_runs(tmp_path, capsys, monkeypatch):
    d = tmp_path / "s"
    base = ["--sweep_dir", str(d), "--seed", "1", "2", "--model_dir", str(tmp_path)]
    assert "give 1 or more" in _usage_error([*base, "--executor", "local", "--parallel", "0"], capsys)
    assert "needs --executor local or slurm" in _usage_error([*base, "--parallel", "2"], capsys)
    assert "--slurm_partition needs --executor slurm" in _usage_error(
        [*base, "--executor", "local", "--slurm_partition", "gpu"], capsys)
    assert "needs --executor slurm" in _usage_error([*base, "--slurm_mem_gb", "8"], capsys)
    cores = len(os.sched_getaffinity(0))
    err = _usage_error([*base, "--executor", "local", "--parallel", str(cores + 1)], capsys)
    assert f"may use {cores} CPU core(s)" in err or "GPU(s)" in err
    assert "KEY=VALUE" in _usage_error([*base, "--executor", "slurm", "--slurm_option", "account"], capsys)
    grid = tmp_path / "grid.yaml"
    grid.write_text("seed: [1, 2]\nslurm: {partition: gpu, gpus: 2}\n")
    assert "unknown key 'gpus'" in _usage_error(["--sweep_dir", str(d), "--grid", str(grid), "--executor", "slurm"],
                                                capsys)
    grid.write_text("seed: [1, 2]\nslurm: {time_min: -5}\n")
    assert "time_min must be a positive" in _usage_error(
        ["--sweep_dir", str(d), "--grid", str(grid), "--executor", "slurm"], capsys)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert "`sbatch` is not on PATH" in _usage_error([*base, "--executor", "slurm"], capsys)
    assert not d.exists()


# -- the Slurm submission, without a cluster ---------------------------------------------------------------
def test_slurm_submission_is_one_capped_array_with_the_points_resources(tmp_path, monkeypatch):
    """The sbatch script submitit writes for a 4-point sweep with --parallel 2 (built by submitit itself; only
    its `srun` probe is satisfied by a stub on PATH, nothing is submitted)."""
    import submitit
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 0\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    grid = tmp_path / "grid.yaml"
    grid.write_text("seed: [1, 2, 3, 4]\nslurm: {partition: short, mem_gb: 16, options: {account: nlp}}\n")
    opts, _ = sweep.build_parser().parse_known_args(
        ["--executor", "slurm", "--parallel", "2", "--slurm_partition", "gpu", "--slurm_gpus_per_point", "1",
         "--slurm_cpus_per_point", "8", "--time_min", "120", "--slurm_option", "qos=high",
         "--slurm_setup", "module load cuda"])
    for tool in ("sbatch", "squeue", "scancel"):
        (stub / tool).write_text("#!/bin/sh\nexit 1\n")
        (stub / tool).chmod(0o755)
    settings = sweep.check_scheduling(opts, str(grid), 4)
    assert settings["partition"] == "gpu" and settings["mem_gb"] == 16  # the flag wins over the grid file
    ex = sweep.slurm_executor(tmp_path / "submitit", settings)
    inner = ex._executor
    inner.parameters["map_count"] = 4  # what submitit sets when it submits 4 jobs in one batch
    text = inner._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
    lines = text.splitlines()
    assert "#SBATCH --array=0-3%2" in lines
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=16GB", "#SBATCH --time=120", "#SBATCH --requeue", "#SBATCH --account=nlp",
                 "#SBATCH --qos=high", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=USR2@90", "module load cuda"):
        assert line in lines, (line, text)
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    assert isinstance(ex, submitit.AutoExecutor)
