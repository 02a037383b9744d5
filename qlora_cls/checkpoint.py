"""Full training state, saved atomically, so a killed run resumes to the same result.

A checkpoint folder holds the trainable weights (LoRA + head, safetensors), optimizer and scheduler
state (8-bit state included), every process's RNG state and the progress (epoch, micro-batch
position, step, metrics so far). It is written under a temporary name and renamed into place, so it
is either complete or absent. Only the main process writes; the RNG states of all processes are
gathered to it first. Loading uses ``torch.load(weights_only=True)``: no pickled code runs.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
DIR = "checkpoints"


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and are ignored)."""
    root = Path(run_dir) / DIR
    return sorted(p for p in root.glob(f"{PREFIX}*") if (p / "progress.json").is_file()) if root.is_dir() else []


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(accelerator, run_dir: Path, model, optimizer, scheduler, progress: dict, keep: int) -> Path | None:
    """Collective: every process calls it; the main process writes."""
    from .files import atomic_dir, atomic_write_json
    rngs = accelerator.gather_for_metrics([_rng_state()], use_gather_object=True)
    weights = trainable_state(accelerator.unwrap_model(model))
    path = None
    if accelerator.is_main_process:
        root = Path(run_dir) / DIR
        root.mkdir(exist_ok=True)
        path = root / f"{PREFIX}{progress['global_step']:08d}"
        with atomic_dir(path) as tmp:
            save_file(weights, tmp / "trainable.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            atomic_write_json(tmp / "progress.json", progress)  # last: its presence marks completeness
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; return the saved progress."""
    progress = json.loads((path / "progress.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(accelerator.unwrap_model(model).named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} has weights the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rngs = torch.load(path / "rng.pt", weights_only=True)
    if len(rngs) != accelerator.num_processes:
        raise RuntimeError(f"checkpoint {path} was written by {len(rngs)} processes, this run has "
                           f"{accelerator.num_processes}; resume with the same process count")
    _set_rng_state(rngs[accelerator.process_index])
    return progress
