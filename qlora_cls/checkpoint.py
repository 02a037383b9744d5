"""Full training state, saved atomically, so a killed run resumes to the same result.

A checkpoint folder (trainable weights, optimizer, scheduler, every process's RNG, progress) is written under
a temporary name and renamed: complete or absent; loading runs no pickled code (DeepSpeed's own shards aside).
Contents: docs/scale-out.md#checkpoint-module.

Not ``accelerator.save_state``: its loader unpickles registered objects (``weights_only=False``) and skips an
unreadable RNG file silently (docs/scale-out.md#checkpoint-module-why-not-acceleratorsave_state).
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

from .config import role_fields, with_fields_added_later
from .errors import UsageError
from .files import atomic_write_json, atomic_write_text, make_temp_dir, move_dir_into_place

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


# Fields that may change between the interrupted command and the resuming one: they do not change
# what is computed. Anything else differing would silently mix two experiments in one folder.
RESUME_MAY_CHANGE = role_fields("bookkeeping", "command")


def check_resumable(run_dir: Path, config: dict, target_modules=None) -> None:
    """Refuse to resume a finished run, or one started with different settings.

    With ``target_modules`` (the LoRA targets resolved for the model), the targets are compared as
    resolved: a run saved with ``q_proj v_proj`` resumes under the ``attention-qv`` preset that means them.
    """
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").is_file():
        raise UsageError(f"--resume: {run_dir} already finished (metrics.json exists); nothing to resume")
    # A run saved before a field existed ran with that field's old behaviour, not with its new default.
    records = json.loads((run_dir / "config.json").read_text())
    saved = with_fields_added_later(records["config"])
    if target_modules is not None:
        saved["target_modules"] = records.get("resolved", {}).get("target_modules", saved.get("target_modules"))
        config = {**config, "target_modules": list(target_modules)}
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in RESUME_MAY_CHANGE and saved.get(k) != config.get(k))
    if differ:
        detail = ", ".join(f"--{k} {saved.get(k)!r} -> {config.get(k)!r}" for k in differ[:4])
        raise UsageError(f"--resume: {run_dir} was started with other settings ({detail}); resume with the "
                         f"original flags (see its config.json) or start a new --results_path")


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (those after it will be trained and logged again)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _is_deepspeed(accelerator) -> bool:
    return "DEEPSPEED" in str(accelerator.distributed_type)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(accelerator, run_dir: Path, model, optimizer, scheduler, progress: dict, keep: int) -> Path | None:
    """Collective: every process calls it; the main process writes."""
    from accelerate.utils import broadcast_object_list, gather_object
    # One state per process, in rank order. Not gather_for_metrics: after an evaluation loader it may drop a
    # dataloader's "remainder" from what it gathers, and these are per-process objects, not samples.
    rngs = gather_object([_rng_state()])
    deepspeed = _is_deepspeed(accelerator)
    root = Path(run_dir) / DIR
    path = root / f"{PREFIX}{progress['global_step']:08d}"
    tmp = None
    if accelerator.is_main_process:
        root.mkdir(exist_ok=True)
        tmp = make_temp_dir(root, path.name)
    tmp = Path(broadcast_object_list([str(tmp)])[0])
    try:
        if deepspeed:
            # The engine owns the (possibly sharded) fp32 master weights and optimizer state: every
            # process writes its shard. Frozen 4-bit weights are not saved: they come from the base model.
            model.save_checkpoint(str(tmp), tag="engine", exclude_frozen_parameters=True)
        weights = trainable_state(accelerator.unwrap_model(model))
        if accelerator.is_main_process:
            save_file(weights, tmp / "trainable.safetensors")
            if not deepspeed:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            atomic_write_json(tmp / "progress.json", progress)  # last: its presence marks completeness
        accelerator.wait_for_everyone()
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        move_dir_into_place(tmp, path)  # the same step may be saved again (a checkpoint step that ends an epoch)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path if accelerator.is_main_process else None


def load(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; return the saved progress."""
    progress = json.loads((path / "progress.json").read_text())
    if _is_deepspeed(accelerator):
        # DeepSpeed's own loader (it unpickles its files: only load checkpoints you wrote yourself).
        model.load_checkpoint(str(path), tag="engine", load_module_strict=False, load_lr_scheduler_states=False)
    weights = load_file(path / "trainable.safetensors")
    params = dict(accelerator.unwrap_model(model).named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} has weights the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    if not _is_deepspeed(accelerator):
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rngs = torch.load(path / "rng.pt", weights_only=True)
    if len(rngs) != accelerator.num_processes:
        raise RuntimeError(f"checkpoint {path} was written by {len(rngs)} processes, this run has "
                           f"{accelerator.num_processes}; resume with the same process count")
    _set_rng_state(rngs[accelerator.process_index])
    return progress
