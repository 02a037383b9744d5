"""Child processes of a sweep: they end with it, and a finished one is not taken for a running one.

Each point runs in its own process group; if the sweep is killed, ``PR_SET_PDEATHSIG`` sends its children
SIGTERM, so they checkpoint and a re-run resumes. Details: docs/sweeps-and-reports.md#procs-module.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

ENV = "QLORA_CLS_EXIT_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int | None = None) -> bool:
    """SIGTERM to this process when its parent dies (Linux only; elsewhere a no-op returning False)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before the request was in place
    return True


def exit_with_parent_if_asked() -> None:
    """Called first by ft.py and the evaluation scripts: only sweeps ask (a plain ``nohup python ft.py``
    must outlive its shell)."""
    if os.environ.get(ENV) == "1":
        exit_with_parent()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. A zombie does not count: in a container whose PID 1
    reaps orphans late, a finished point stays a zombie that still answers ``kill(pid, 0)``."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():  # no procfs: the signal test, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # state ppid pgrp ... (field 22 of stat is index 19 here)


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" without procfs): with the pid, it names one
    process even after the pid is reused."""
    fields = _stat_fields(pid)
    return fields[19] if fields else ""


def same_process_alive(pid: int, started: str) -> bool:
    """Whether the process that had ``started`` as its start time still runs (zombies do not count)."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.kill(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X") and (not started or fields[19] == started)


def slurm_active(job_ids: list[str]) -> set[str]:
    """Which of these Slurm jobs (``123`` or array tasks ``123_4``) squeue still lists (pending, running,
    requeued, completing). An id squeue no longer knows is not active."""
    arrays = sorted({str(j).split("_")[0] for j in job_ids})
    if not arrays:
        return set()
    proc = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", "--jobs", ",".join(arrays)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise RuntimeError(f"squeue failed: {proc.stderr.strip()[:300]}")
    listed = {line.strip() for line in proc.stdout.splitlines() if line.strip()}
    return {str(j) for j in job_ids if str(j) in listed}
