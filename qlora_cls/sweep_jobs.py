"""One sweep point as a job: the commands sweep.py runs for it, and the callable that submitit runs.

``sweep.py --executor sequential`` runs the commands itself; ``--executor local|slurm`` submits a
:class:`PointJob` per point through submitit (a local process tree, or one task of a Slurm job array).
Either way a point is the same ``accelerate launch ... ft.py ...`` command into the same folder and log,
followed by ``qlora_cls/sweep_eval.py`` for its evaluations. Details: docs/sweeps-and-reports.md#parallel-sweeps.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from . import procs
from .files import atomic_write_json, read_json

REPO = Path(__file__).resolve().parent.parent
JOB_FILE = ".{name}.job.json"  # in <sweep>/logs: the running job's pid and its point's process group


def launch_command(launcher: str, accelerate_config: Optional[str], script: str, args: list[str]) -> list[str]:
    """``accelerate launch [--config_file F] <repo>/<script> args`` (or one plain python process)."""
    if launcher == "python":
        return [sys.executable, str(REPO / script), *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        launch += ["--config_file", str(Path(accelerate_config).resolve())]
    return [*launch, str(REPO / script), *args]


def eval_jobs(run_dir: Path, sweep_dir: Path, base_key: str, eval_prompts: list[str],
              base_eval: bool) -> list[tuple[str, Path, list[str], Optional[str]]]:
    """The evaluations a trained point still lacks: (label, out_dir, eval.py args, base key or None).

    The adapter under every eval prompt, and the base model under each (shared by the points with the
    same ``base_key``); same split and examples as the run's own evaluation."""
    records = read_json(run_dir / "config.json")
    if records["config"].get("objective", "classification") != "classification":
        return []  # --objective sft|lm: the run scored itself and the base model on its own prompts (metrics.json)
    split = records.get("resolved", {}).get("eval_split", "validation")
    common = ["--results_path", str(run_dir), "--split", split, "--overwrite"]  # overwrite: only leftovers
    if records["config"].get("max_eval_samples"):
        common += ["--max_eval_samples", str(records["config"]["max_eval_samples"])]
    jobs = []
    for prompt in eval_prompts:
        name = Path(prompt).stem
        out = run_dir / "evals" / f"{split}-{name}"
        jobs.append((name, out, [*common, "--prompt", prompt, "--output_dir", str(out)], None))
        if base_eval:
            key = f"{base_key}/{split}-{name}-base"
            out = sweep_dir / key
            jobs.append((f"base model under {name}", out,
                         [*common, "--prompt", prompt, "--output_dir", str(out), "--base_only"], key))
    return [j for j in jobs if not (j[1] / "metrics.json").is_file()]


def last_error_line(tail: str) -> str:
    lines = [line for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "(no output)"


def wait_for_group(pgid: int, timeout: float = 300) -> None:
    """Until no process of the group runs (a launcher's workers may still write a checkpoint); then SIGKILL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.group_alive(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _child_setup(parent: int) -> None:
    """In the point's process, before exec: Slurm delivers the preemption signal (submitit's USR2) to every
    process of the job step, and USR2 would kill ft.py outright; ignored (inherited through exec), it reaches
    only the job, whose checkpoint() asks the point to checkpoint with SIGTERM."""
    signal.signal(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")), signal.SIG_IGN)
    procs.exit_with_parent(parent)


@dataclass
class PointJob:
    """Train one point (``--resume`` when its folder holds a started run), then its missing evaluations.

    Runs inside a submitit job. SIGTERM/SIGINT stop the point (ft.py checkpoints) and the job returns
    ``interrupted``; the preemption/timeout signal (submitit's, USR2) calls :meth:`checkpoint`, which stops
    the point the same way and has submitit requeue the job, whose next run resumes the point."""
    name: str
    train: list[str]              # the point's command, without --resume
    run_dir: str
    sweep_dir: str
    eval_launch: list[str]        # command running qlora_cls/sweep_eval.py, without its spec file
    eval_prompts: list[str]
    base_eval: bool
    base_key: str
    env: dict = field(default_factory=dict)   # e.g. OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES
    cpus: Optional[list] = None   # pin the point to these cores (local executor on a CPU machine)
    watch: Optional[tuple] = None  # (pid, start time) of the local sweep: end with it, as sweep children do
    _pgid: int = 0
    _stop: int = 0

    # -- the job ---------------------------------------------------------------------------------
    def __call__(self) -> dict:
        self._pgid, self._stop = 0, 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)  # inherited by the launcher and ft.py
        run_dir, logs = Path(self.run_dir), Path(self.sweep_dir) / "logs"
        out: dict = {"name": self.name, "host": os.uname().nodename, "cpus": self.cpus,
                     "env": dict(self.env), "train": "skipped"}
        if not (run_dir / "metrics.json").is_file():
            from .sweeps import clear_sweep_files
            clear_sweep_files(run_dir)
            resume = (run_dir / "config.json").is_file()
            started = time.perf_counter()
            code, tail = self._run(self.train + (["--resume"] if resume else []), logs / f"{self.name}.log")
            out.update(returncode=code, seconds=round(time.perf_counter() - started, 1), resumed=resume)
            if code == 0 and (run_dir / "metrics.json").is_file():
                out["train"] = "finished"
            elif self._stop:
                out["train"] = "interrupted"
            else:
                out.update(train="failed", error=f"exit code {code}\n{tail}")
        if (run_dir / "metrics.json").is_file() and not self._stop:
            out["evals"] = self._evaluate(run_dir, logs)
        out["stopped"] = self._stop
        return out

    def checkpoint(self, *args, **kwargs):
        """Preempted or about to time out: the point checkpoints and ends, then the job is requeued as is."""
        from submitit.helpers import DelayedSubmission
        self._on_signal(signal.SIGTERM, None)
        if self._pgid:
            wait_for_group(self._pgid)
        return DelayedSubmission(self)

    # -- helpers -----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        # The first signal asks the point to checkpoint; escalation (SIGKILL) is the sweep's decision.
        if not self._stop:
            self._stop = signum
            if self._pgid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._pgid, signal.SIGTERM)

    def _watched_gone(self) -> bool:
        return bool(self.watch) and not procs.same_process_alive(*self.watch)

    def _run(self, cmd: list[str], log_path: Path) -> tuple[int, str]:
        if self._stop:
            return 128 + self._stop, ""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{procs.ENV: "1"}, **self.env)
        me = os.getpid()
        with open(log_path, "a", encoding="utf-8") as log:
            start = log.tell()
            log.write(f"\n### {datetime.now().isoformat(timespec='seconds')} {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, preexec_fn=lambda: _child_setup(me))
            self._pgid = proc.pid
            atomic_write_json(log_path.parent / JOB_FILE.format(name=self.name),
                              {"job_pid": me, "process_group": proc.pid, "started": procs.start_time(me)})
            if self._stop:  # a signal came between Popen and here
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            while True:
                try:
                    code = proc.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    if self._watched_gone():  # the local sweep was killed: checkpoint and end
                        self._on_signal(signal.SIGTERM, None)
            wait_for_group(proc.pid)
            self._pgid = 0
        with open(log_path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            tail = "\n".join(f.read().splitlines()[-25:])
        return code, tail

    def _evaluate(self, run_dir: Path, logs: Path) -> list:
        """[label, base key or None, error or None] for each evaluation run now. The base-model evaluations
        are shared by every point with the same base key: a lock file lets one job write them, the others
        then find them done."""
        sweep_dir = Path(self.sweep_dir)
        with contextlib.ExitStack() as stack:
            if self.base_eval:
                lock = open(sweep_dir / f".{self.base_key}.lock", "w")
                stack.enter_context(lock)
                fcntl.flock(lock, fcntl.LOCK_EX)
            jobs = eval_jobs(run_dir, sweep_dir, self.base_key, self.eval_prompts, self.base_eval)
            if not jobs:
                return []
            spec = logs / f".{self.name}.evals.json"
            results = spec.with_suffix(".results.json")
            results.unlink(missing_ok=True)
            atomic_write_json(spec, {"jobs": [j[2] for j in jobs], "results": str(results)})
            code, tail = self._run([*self.eval_launch, str(spec)], logs / f"{self.name}.evals.log")
        if self._stop:
            return []
        errors = read_json(results) if results.is_file() else [f"exit code {code}: {last_error_line(tail)}"] * len(jobs)
        out = []
        for (label, target, _, key), error in zip(jobs, errors):
            if error is None and not (target / "metrics.json").is_file():
                error = "no metrics.json written"
            out.append([label, key, error])
        return out


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else those `nvidia-smi -L` lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    import shutil
    if shutil.which("nvidia-smi") is None:
        return []
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return [str(i) for i, line in enumerate(proc.stdout.splitlines()) if line.startswith("GPU ")]


def local_slots(parallel: int) -> list[dict]:
    """This machine split into ``parallel`` slots: each gets its own GPUs (CUDA_VISIBLE_DEVICES) when there
    are GPUs, and its own cores (pinned, OMP_NUM_THREADS = their count) so two points never share a core."""
    from .errors import UsageError
    gpus = visible_gpus()
    cores = sorted(os.sched_getaffinity(0))
    if gpus and len(gpus) < parallel:
        raise UsageError(f"--parallel {parallel}: this machine has {len(gpus)} GPU(s) "
                         f"({','.join(gpus)}); give at most {len(gpus)} so each point has its own")
    if not gpus and len(cores) < parallel:
        raise UsageError(f"--parallel {parallel}: this process may use {len(cores)} CPU core(s); give at most "
                         f"{len(cores)} so each point has its own")
    slots = []
    for k in range(parallel):
        slot: dict = {"env": {}, "cpus": None}
        if len(cores) >= parallel:
            per = len(cores) // parallel
            slot["cpus"] = cores[k * per:(k + 1) * per]
            slot["env"].update(OMP_NUM_THREADS=str(per), MKL_NUM_THREADS=str(per))
        if gpus:
            per = len(gpus) // parallel
            slot["env"]["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[k * per:(k + 1) * per])
        slots.append(slot)
    return slots
