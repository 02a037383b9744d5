"""Accuracy parity over seeds: ft.py with its defaults against the Trainer + PEFT recipe, same data and steps.

    python bench/parity.py --seeds 1 2 3 --dataset ../shared/data/glue            # both sides, one after another
    OMP_NUM_THREADS=1 taskset -c 0 python bench/parity.py --sides ft ...          # or one side per core
    OMP_NUM_THREADS=1 taskset -c 1 python bench/parity.py --sides trainer ...
    python bench/parity.py --report_only ...                                      # the table from what exists

Each (side, seed) is one full run (default: 2 epochs of MRPC = 918 optimizer steps of batch 8, the whole
validation split), in its own subprocess, in a folder under ``--state_dir`` that outlives the session:
ft.py checkpoints every 50 steps (``--resume``), the Trainer every 50 steps (``resume_from_checkpoint``),
so a run stopped by the end of a session continues where it was in the next one, and finished runs are
not run again. On this project's CPUs one run takes ~30 minutes on one core in bf16 (an AMX Intel, an
AVX512-BF16 AMD EPYC: 1781 s of training) and ~60 in float32, so the study spans sessions by design.

The sides, as the parity issue defines them: the Trainer recipe as users write it (bench.py's
``trainer_grouped_bf16`` arm: NF4 + double quantization, bf16 compute, LoRA r=8/alpha 16/dropout 0.1 on
q,v, 8-bit AdamW, lr 3e-4, batch 8, 6 % warm-up, length grouping, the "perfect" prompt) for the same
number of steps as ft.py's epochs, and ``ft.py`` with its defaults (compute dtype ``auto``: recorded per
run, as it differs by CPU). The report (Markdown + JSON in ``--out``) lists every run, the mean and
sample standard deviation per side, and the target: ft.py's mean >= the recipe's mean - 0.5 points.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIDES = ("ft", "trainer")
TARGET_POINTS = -0.5  # ft.py's mean accuracy minus the recipe's, in points, at least this


def parse_args(argv=None):
    from qlora_cls.modeling import cache_home
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run per side and seed")
    p.add_argument("--sides", default="ft,trainer", help="comma-separated: ft, trainer")
    p.add_argument("--dataset", default="nyu-mll/glue", help="GLUE hub id or local folder in hub layout")
    p.add_argument("--model_dir", default=None, help="base model; none = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--epochs", type=int, default=2, help="ft.py epochs; the Trainer runs the same number of steps")
    p.add_argument("--state_dir", default=str(cache_home() / "parity"),
                   help="where the runs live between sessions (default: %(default)s)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for parity.md and parity.json")
    p.add_argument("--report_only", action="store_true", help="write the report from the finished runs, run nothing")
    p.add_argument("--max_train_samples", type=int, default=None, help="(tests) use only the first N training examples")
    p.add_argument("--max_eval_samples", type=int, default=None, help="(tests) evaluate only the first N examples")
    p.add_argument("--run_one", default=None, help=argparse.SUPPRESS)  # internal: side:seed in this process
    args = p.parse_args(argv)
    bad = [s for s in args.sides.split(",") if s not in SIDES]
    if bad:
        p.error(f"--sides: unknown {', '.join(bad)}; valid: {', '.join(SIDES)}")
    if args.epochs <= 0:
        p.error("--epochs must be > 0")
    return args


def run_dir(args, side: str, seed: int) -> Path:
    return Path(args.state_dir) / f"{side}-seed{seed}"


def ft_steps(args) -> int:
    """The optimizer steps of ft.py's --epochs on one process (its own batch plan)."""
    from bench.bench import tokenized_data, train_config
    from qlora_cls.batching import LengthGroupedBatchSampler
    cfg = train_config(_bench_args(args, 1, steps=1))
    lengths = tokenized_data(cfg)[3]["train"]["length"]
    return args.epochs * len(LengthGroupedBatchSampler(lengths, cfg.batch_size, cfg.seed, 1, cfg.group_by_length))


def _bench_args(args, seed: int, steps: int):
    from bench.bench import parse_args as bench_args
    argv = ["--steps", str(steps), "--seed", str(seed), "--dataset", args.dataset]
    for flag in ("model_dir", "max_train_samples", "max_eval_samples"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    return bench_args(argv)


def run_one(args, side: str, seed: int) -> dict:
    """One run to its end (resuming what an earlier session left); its result, also written to result.json."""
    folder = run_dir(args, side, seed)
    folder.mkdir(parents=True, exist_ok=True)
    if side == "trainer":
        from bench.bench import _derive, run_trainer
        r = _derive(run_trainer(_bench_args(args, seed, ft_steps(args)), True, "bfloat16", state_dir=folder / "trainer"))
        result = {k: r[k] for k in ("accuracy", "f1", "compute_dtype", "train_steps", "train_seconds")}
    else:
        import ft
        run = folder / "run"
        argv = ["--dataset", args.dataset, "--seed", str(seed), "--epochs", str(args.epochs),
                "--results_path", str(run), "--checkpoint_every", "50", "--latency_calls", "0"]
        for flag in ("model_dir", "max_train_samples", "max_eval_samples"):
            if getattr(args, flag) is not None:
                argv += [f"--{flag}", str(getattr(args, flag))]
        if (run / "config.json").is_file():
            argv.append("--resume")
        summary = ft.main(argv)
        cfg = json.loads((run / "config.json").read_text())["config"]
        result = {"accuracy": summary["final"]["accuracy"], "f1": summary["final"]["f1"],
                  "compute_dtype": cfg["bnb_4bit_compute_dtype"], "train_steps": summary["run"]["steps"],
                  "train_seconds": summary["train_seconds"]}
    result.update(side=side, seed=seed, finished=datetime.now().isoformat(timespec="seconds"))
    from qlora_cls.files import atomic_write_json
    atomic_write_json(folder / "result.json", result)  # its presence: this run is done
    return result


def finished(args) -> list[dict]:
    out = []
    for side in SIDES:
        for seed in args.seeds:
            f = run_dir(args, side, seed) / "result.json"
            if f.is_file():
                out.append(json.loads(f.read_text()))
    return out


def summarize(results: list[dict]) -> dict:
    """Means, spread and the verdict over the seeds finished on *both* sides: a side's extra seeds would make
    the two means averages over different seeds (the seed moves both sides alike: see the paired figures).
    The runs left out are listed in ``unpaired``."""
    seeds = {side: {r["seed"] for r in results if r["side"] == side} for side in SIDES}
    common = seeds["ft"] & seeds["trainer"]
    unpaired = [f"{r['side']} seed {r['seed']}" for r in results if r["seed"] not in common]
    results = [r for r in results if r["seed"] in common]
    sides = {}
    for side in SIDES:
        acc = [100 * r["accuracy"] for r in results if r["side"] == side]
        f1 = [100 * r["f1"] for r in results if r["side"] == side]
        sides[side] = {"runs": len(acc), "accuracy_mean": statistics.fmean(acc) if acc else None,
                       "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else None,
                       "f1_mean": statistics.fmean(f1) if f1 else None,
                       "f1_std": statistics.stdev(f1) if len(f1) > 1 else None}
    ft, tr = sides["ft"], sides["trainer"]
    diff = ft["accuracy_mean"] - tr["accuracy_mean"] if ft["runs"] and tr["runs"] else None
    enough = ft["runs"] >= 3 and tr["runs"] >= 3
    # The standard error of the difference of the two means (Welch): how far seed noise alone moves it.
    se = (math.sqrt(ft["accuracy_std"] ** 2 / ft["runs"] + tr["accuracy_std"] ** 2 / tr["runs"])
          if ft["accuracy_std"] is not None and tr["accuracy_std"] is not None else None)
    # Paired by seed: both sides call set_seed(seed) before building the model, so a seed's fresh head and
    # LoRA initialisation may be shared; the per-seed differences then vary less than the runs do.
    by_seed = {side: {r["seed"]: 100 * r["accuracy"] for r in results if r["side"] == side} for side in SIDES}
    pairs = [by_seed["ft"][k] - by_seed["trainer"][k] for k in sorted(set(by_seed["ft"]) & set(by_seed["trainer"]))]
    paired = {"seeds": len(pairs), "mean": statistics.fmean(pairs) if pairs else None,
              "standard_error": statistics.stdev(pairs) / math.sqrt(len(pairs)) if len(pairs) > 1 else None}
    return {"sides": sides, "seeds_compared": sorted(common), "unpaired": unpaired,
            "accuracy_points_ft_minus_trainer": diff, "accuracy_points_standard_error": se,
            "paired_by_seed": paired,
            "target_points": TARGET_POINTS,
            "target_met": (diff >= TARGET_POINTS) if (enough and diff is not None) else None,
            "note": None if enough else "fewer than 3 seeds finished on both sides: no verdict yet"}


def markdown(args, results: list[dict], summary: dict) -> str:
    def f(v, fmt="{:.2f}"):
        return "–" if v is None else fmt.format(v)

    lines = [f"Accuracy parity, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}, model "
             f"{args.model_dir or 'embedded SmolLM2-135M-Instruct'}, data {args.dataset}"
             f"{'' if args.max_eval_samples is None else f', first {args.max_eval_samples} validation examples'}.", "",
             "| side | seed | compute dtype | steps | val. accuracy (%) | val. F1 (%) | train s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    names = {"ft": "ft.py (defaults)", "trainer": "Trainer + PEFT recipe (bf16, group_by_length)"}
    for r in sorted(results, key=lambda r: (r["side"], r["seed"])):
        lines.append(f"| {names[r['side']]} | {r['seed']} | {r['compute_dtype']} | {r['train_steps']} | "
                     f"{100 * r['accuracy']:.2f} | {100 * r['f1']:.2f} | {r['train_seconds']:.0f} |")
    compared = summary.get("seeds_compared") or []
    lines += ["", f"Means over the seeds finished on both sides ({', '.join(map(str, compared)) or 'none'})"
              + (f"; not in them (no run of the other side yet): {', '.join(summary['unpaired'])}"
                 if summary.get("unpaired") else "") + ".",
              "", "| side | runs | accuracy mean ± std (%) | F1 mean ± std (%) |", "| --- | ---: | ---: | ---: |"]
    for side, s in summary["sides"].items():
        lines.append(f"| {names[side]} | {s['runs']} | {f(s['accuracy_mean'])} ± {f(s['accuracy_std'])} | "
                     f"{f(s['f1_mean'])} ± {f(s['f1_std'])} |")
    met = summary["target_met"]
    se = summary.get("accuracy_points_standard_error")
    lines += ["", f"ft.py minus the recipe: {f(summary['accuracy_points_ft_minus_trainer'])} points of accuracy "
              f"(standard error of the difference {f(se)}; target >= {TARGET_POINTS:g}): "
              f"{'–' if met is None else 'met' if met else 'NOT met'}"
              + (f" ({summary['note']})" if summary["note"] else "")]
    paired = summary.get("paired_by_seed") or {}
    if paired.get("seeds"):
        lines.append(f"Paired by seed ({paired['seeds']} seeds run on both sides): mean difference "
                     f"{f(paired['mean'])}, standard error {f(paired['standard_error'])}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_one:
        side, seed = args.run_one.split(":")
        return run_one(args, side, int(seed))
    if not args.report_only:
        argv = list(sys.argv[1:] if argv is None else argv)
        for seed in args.seeds:  # seeds outermost: an interrupted study has both sides of its first seeds
            for side in args.sides.split(","):
                if (run_dir(args, side, seed) / "result.json").is_file():
                    continue
                print(f"[parity] {side} seed {seed}: running (state in {run_dir(args, side, seed)}) ...", flush=True)
                log = run_dir(args, side, seed)
                log.mkdir(parents=True, exist_ok=True)
                with open(log / "log.txt", "a") as logf:
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv,
                                           "--run_one", f"{side}:{seed}"], stdout=logf, stderr=subprocess.STDOUT,
                                          cwd=str(REPO))
                if proc.returncode != 0:
                    print(f"[parity] {side} seed {seed}: exit {proc.returncode} (see {log / 'log.txt'}); "
                          f"re-run to resume it", flush=True)
    results = finished(args)
    summary = summarize(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("run_one", "report_only")},
              "runs": results, **summary}
    from qlora_cls.files import atomic_write_json, atomic_write_text
    atomic_write_json(out / "parity.json", report)
    md = markdown(args, results, summary)
    atomic_write_text(out / "parity.md", md)
    print(md)
    return report


if __name__ == "__main__":
    main()
