"""A bare ``python ft.py`` before and after the CPU defaults changed: the same run, old flags vs none.

    python bench/defaults_ab.py --steps 30 --dataset ../shared/data/glue

Runs ft.py twice, one after the other, each in its own process with the same seed, data and steps:
``old`` = ``--bnb_4bit_compute_dtype float32 --gradient_checkpointing true`` (what ``auto`` and the
default meant on a CPU before), ``new`` = no flag (today's ``auto``: bf16 on a CPU with AMX-BF16,
no checkpointing on a CPU). Per-step seconds come from ``train_log.jsonl`` (``--log_every 1``); the
median is robust to a step slowed down by another process. Writes ``bench/results/defaults-ab-<stamp>.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = {"old": ["--bnb_4bit_compute_dtype", "float32", "--gradient_checkpointing", "true"], "new": []}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--max_eval_samples", type=int, default=64, help="evaluation is not what is compared")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more ft.py flags for both runs")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    result = {"started": datetime.now().isoformat(timespec="seconds"), "settings": vars(args), "arms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, flags in ARMS.items():
            run = Path(tmp) / arm
            cmd = [sys.executable, str(REPO / "ft.py"), "--dataset", args.dataset, "--max_steps", str(args.steps),
                   "--seed", str(args.seed), "--log_every", "1", "--max_eval_samples", str(args.max_eval_samples),
                   "--results_path", str(run), *flags, *args.extra]
            print(f"[defaults_ab] {arm}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
            config = json.loads((run / "config.json").read_text())["config"]
            metrics = json.loads((run / "metrics.json").read_text())
            seconds = [n / e["examples_per_s"] for n, e in zip(_batch_sizes(run), log)]  # one step per log line
            result["arms"][arm] = {
                "flags": flags, "compute_dtype": config["bnb_4bit_compute_dtype"],
                "gradient_checkpointing": config["gradient_checkpointing"],
                "median_seconds_per_step": statistics.median(seconds), "step_seconds": seconds,
                "train_seconds": metrics["train_seconds"], "losses": [e["loss"] for e in log],
                "final": {k: metrics["final"].get(k) for k in ("accuracy", "f1")}}
            a = result["arms"][arm]
            print(f"[defaults_ab] {arm}: {a['compute_dtype']}, checkpointing {a['gradient_checkpointing']}: median "
                  f"{a['median_seconds_per_step']:.2f} s/step, {a['train_seconds']:.1f} s for {args.steps} steps",
                  flush=True)
    old, new = result["arms"]["old"], result["arms"]["new"]
    result["speedup_median_step"] = old["median_seconds_per_step"] / new["median_seconds_per_step"]
    result["speedup_train_seconds"] = old["train_seconds"] / new["train_seconds"]
    print(f"[defaults_ab] new defaults: {result['speedup_median_step']:.2f}x (median step), "
          f"{result['speedup_train_seconds']:.2f}x (training time)")
    from bench.results_io import write_result
    write_result(args.out, "defaults-ab-", result, tag="defaults_ab")
    return result


def _batch_sizes(run: Path) -> list[int]:
    """Examples in each of the run's steps: batch sizes depend on the example count and seed, not on lengths."""
    sys.path.insert(0, str(REPO))
    from qlora_cls.batching import train_batches
    records = json.loads((run / "config.json").read_text())
    cfg, n = records["config"], records["resolved"]["train_examples"]
    return [len(b) for b in train_batches([0] * n, cfg["batch_size"], cfg["seed"], 0, 1, 0, 1, cfg["group_by_length"])]


if __name__ == "__main__":
    main()
