"""Same model, same process, interleaved: ft.py's loop against a plain step, on the same batches.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/loop_ab.py --dataset ../shared/data/glue --steps 24

``make bench`` runs its arms one after another in separate processes; on a shared 2-core machine the
speed of a core drifts between arms by more than the few percent its targets turn on. This script builds
ft.py's model once (``ft.setup`` + ``ft.build_training``, ft.py's defaults) and, for each of ft.py's
first ``--steps`` batches, times in turn (order reversed every step, so drift hits all arms alike):

- ``ft_loop``: the calls ft.py's loop makes per micro-batch (its forward, with the prompt's shared prefix
  run once per batch where ``--share_prefix`` applies; accelerate's ``accumulate``, ``backward``,
  ``clip_grad_norm_``, the finite check, optimizer and scheduler step), copied from ``ft.train``;
- ``plain``: ``bench.train_step`` (``model(**batch)``, ``loss.backward()``, clip, step) on the same padded
  batch;
- ``dense``: ``bench.train_step`` on the batch re-shaped without padding (``bench.dense_batch``: the
  dense limit's batches);
- ``random``: ``bench.train_step`` on a batch of 8 rows drawn at random (seeded), padded to its
  longest row: the batch composition of the Trainer's default sampling.

All arms share one model and optimizer (the weights move on between arms; the shapes, which set the
cost, do not). It prints and writes real tokens/s per arm and the ratios (``bench/results/loop-ab-*``).
The first two steps are left out (warm-up).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARMS = ("ft_loop", "plain", "dense", "random")
WARMUP = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--model_dir", default=None, help="base model; none = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--steps", type=int, default=24, help="batches per arm (the first two are warm-up)")
    p.add_argument("--max_train_samples", type=int, default=None, help="(tests) use only the first N examples")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    if args.steps <= WARMUP:
        p.error(f"--steps must be > {WARMUP}")
    return args


def main(argv=None) -> dict:
    import torch

    import ft
    from bench.bench import _machine, dense_batch, train_step
    from bench.results_io import write_result
    from qlora_cls.batching import train_batches
    from qlora_cls.cli import parse_dataclass
    from qlora_cls.config import TrainConfig

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--dataset", args.dataset, "--results_path", str(Path(tmp) / "run"), "--max_steps", str(args.steps)]
        for flag in ("model_dir", "max_train_samples"):
            if getattr(args, flag) is not None:
                flags += [f"--{flag}", str(getattr(args, flag))]
        cfg = parse_dataclass(TrainConfig, flags, "ft.py", ft.__doc__)
        run = ft.setup(cfg)
        model, optimizer, scheduler, trainable = ft.build_training(run)
        acc, rows_of = run.accelerator, run.train_rows
        lengths, ids, labels = rows_of.lengths, rows_of.input_ids, rows_of.labels.tolist()
        plan = train_batches(lengths, cfg.batch_size, cfg.seed, 0, 1, 0, 1, cfg.group_by_length)[:args.steps]
        g = torch.Generator().manual_seed(cfg.seed)
        random_rows = [torch.randperm(len(lengths), generator=g)[:cfg.batch_size].tolist() for _ in plan]

        forward = run.prefix.forward(acc.autocast)

        def ft_loop(rows):
            batch = {k: v.to(acc.device) for k, v in rows_of(rows).items()}
            with acc.accumulate(model):
                loss = forward(model, batch).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    norm = torch.as_tensor(acc.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")) or 0.0)
                    if torch.isfinite(norm):
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)

        def step(batch):
            train_step(model, {k: v.to(acc.device) for k, v in batch.items()}, trainable, optimizer, scheduler,
                       cfg.max_grad_norm or float("inf"))

        arms = {"ft_loop": (ft_loop, plan), "plain": (lambda r: step(rows_of(r)), plan),
                "dense": (lambda r: step(dense_batch(r, lengths, ids, labels, acc.device)), plan),
                "random": (lambda r: step(rows_of(r)), random_rows)}
        seconds = {a: [] for a in ARMS}
        tokens = {a: [] for a in ARMS}
        model.train()
        for i in range(len(plan)):
            for arm in (ARMS if i % 2 == 0 else ARMS[::-1]):
                fn, batches = arms[arm]
                start = time.perf_counter()
                fn(batches[i])
                seconds[arm].append(time.perf_counter() - start)
                tokens[arm].append(sum(lengths[r] for r in batches[i]))
        acc.end_training()
    per_arm = {a: {"tokens_per_s": sum(tokens[a][WARMUP:]) / sum(seconds[a][WARMUP:]),
                   "median_step_seconds": statistics.median(seconds[a][WARMUP:]),
                   "real_tokens": sum(tokens[a][WARMUP:]), "steps": len(seconds[a]) - WARMUP,
                   "step_seconds": seconds[a], "step_tokens": tokens[a]} for a in ARMS}
    ratios = {f"ft_loop_over_{a}": per_arm["ft_loop"]["tokens_per_s"] / per_arm[a]["tokens_per_s"]
              for a in ARMS if a != "ft_loop"}
    result = {"machine": _machine(), "settings": {**vars(args), "compute_dtype": cfg.bnb_4bit_compute_dtype,
                                                  "batch_size": cfg.batch_size, "seed": cfg.seed},
              "arms": per_arm, "ratios": ratios}
    lines = [f"Loop A/B, one process, {per_arm['plain']['steps']} timed steps per arm, interleaved; "
             f"{cfg.bnb_4bit_compute_dtype} compute, batch {cfg.batch_size}.", "",
             "| arm | real tokens/s | median s/step | real tokens |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {a} | {per_arm[a]['tokens_per_s']:.1f} | {per_arm[a]['median_step_seconds']:.3f} | "
              f"{per_arm[a]['real_tokens']} |" for a in ARMS]
    lines += ["", "ft_loop / " + ", ft_loop / ".join(f"{k.split('_over_')[1]}: {v:.3f}" for k, v in ratios.items())]
    path = write_result(args.out, "loop-ab-", result, "\n".join(lines) + "\n", tag="loop-ab")
    result["json_path"] = str(path)
    return result


if __name__ == "__main__":
    main()
