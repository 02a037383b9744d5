"""Run records: guarding a results folder, and recording where and with what a run happened.

Nothing here knows about models or data: it is the bookkeeping around them (results path checks,
package versions, git commit, hardware, peak memory).
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from qlora_cls.errors import UsageError

REPO_DIR = Path(__file__).resolve().parent
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate", "deepspeed")


def check_results_path(path: Path, resume: bool) -> None:
    """Refuse a results path that is a file, or that already holds a run (unless resuming it)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--results_path {path} is a file; give a folder path")
    if resume:
        if not (path / "config.json").is_file():
            raise UsageError(f"--resume: {path} holds no run to resume (no config.json)")
        return
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"--results_path {path} already holds files; runs are never overwritten: choose a new "
                         f"path, or pass --resume to continue an unfinished run there")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_info() -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def peak_memory_bytes(device) -> int:
    """Peak memory of this process: allocated CUDA memory on a GPU, resident set size on the CPU."""
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
