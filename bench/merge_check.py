"""Merged = unmerged on a whole split: one trained run's adapter and its merged folder, both through predict.py.

    python bench/merge_check.py --results_path results/<run> --dataset ../shared/data/glue   # a run you have
    python bench/merge_check.py --train_steps 100 --dataset ../shared/data/glue --compute_dtype bfloat16

Writes the split's text columns (and ``idx`` as the id) to a CSV the toolkit has not seen, labels it
with ``predict.py`` from the run (4-bit base + adapter, the run's compute dtype) and from ``merge.py``'s
folder (plain transformers, float32), and compares: argmax agreement, max |probability difference|,
and for every disagreement the adapter's own margin |p1 - p0|, since under bf16 compute the adapter's
rounding can move a near tie across the boundary while the merged float32 model computes the exact
function the adapter approximates. Markdown + JSON in ``bench/results/merge-check-<time>``.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results_path", default=None, help="a finished run; none = train one here (--train_steps)")
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--split", default="validation")
    p.add_argument("--train_steps", type=int, default=100, help="steps of the run trained when no --results_path")
    p.add_argument("--compute_dtype", default="auto", help="that run's --bnb_4bit_compute_dtype")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    return p.parse_args(argv)


def _probabilities(path: Path) -> tuple[list[str], list[list[float]]]:
    rows = list(csv.DictReader(open(path)))
    columns = [c for c in rows[0] if c.startswith("prob_")]
    return [r["id"] for r in rows], [[float(r[c]) for c in columns] for r in rows]


def main(argv=None) -> dict:
    import datasets

    import ft
    import merge
    import predict
    from bench.bench import _machine
    from bench.results_io import write_result
    from qlora_cls.runs import load_run_config

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(args.results_path) if args.results_path else tmp / "run"
        if not args.results_path:
            ft.main(["--dataset", args.dataset, "--results_path", str(run), "--max_steps", str(args.train_steps),
                     "--bnb_4bit_compute_dtype", args.compute_dtype, "--latency_calls", "0", "--log_every", "50"])
        cfg, records = load_run_config(run)
        split = datasets.load_dataset(args.dataset, cfg.task)[args.split]
        columns = list(records["resolved"]["text_columns"])  # what the run's prompt fills in
        source = tmp / f"{args.split}.csv"
        with open(source, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", *columns])
            for row in split:
                w.writerow([row["idx"], *(row[c] for c in columns)])
        merged = merge.main(["--results_path", str(run), "--output_dir", str(tmp / "merged")])
        predict.main(["--results_path", str(run), "--input", str(source), "--output", str(tmp / "adapter.csv")])
        predict.main(["--results_path", str(merged), "--input", str(source), "--output", str(tmp / "merged.csv")])
        ids_a, pa = _probabilities(tmp / "adapter.csv")
        ids_m, pm = _probabilities(tmp / "merged.csv")
    assert ids_a == ids_m, "predict.py wrote the rows in different orders"
    argmax = [max(range(len(p)), key=p.__getitem__) for p in pa], [max(range(len(p)), key=p.__getitem__) for p in pm]
    differ = [i for i in range(len(pa)) if argmax[0][i] != argmax[1][i]]
    result = {
        "started": datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
        "run": str(run) if args.results_path else f"trained here: {args.train_steps} steps",
        "compute_dtype": cfg.bnb_4bit_compute_dtype, "method": cfg.method, "split": args.split, "examples": len(pa),
        "argmax_equal": len(pa) - len(differ),
        "max_abs_probability_diff": max(abs(a - b) for x, y in zip(pa, pm) for a, b in zip(x, y)),
        "disagreements": [{"id": ids_a[i], "adapter": pa[i], "merged": pm[i],
                           "adapter_margin": abs(pa[i][0] - pa[i][1])} for i in differ],
    }
    md = (f"Merge check {result['started']}: {result['run']}, {cfg.method}, {cfg.bnb_4bit_compute_dtype} compute; "
          f"{cfg.task} {args.split}, {len(pa)} examples, each labelled by predict.py from the run (4-bit base + adapter) "
          f"and from merge.py's folder (plain transformers, float32).\n\n"
          f"| examples | argmax equal | max abs probability diff | disagreements (adapter margin) |\n"
          f"| ---: | ---: | ---: | --- |\n"
          f"| {len(pa)} | {result['argmax_equal']} | {result['max_abs_probability_diff']:.2e} | "
          + (", ".join(f"{d['id']} ({d['adapter_margin']:.4f})" for d in result["disagreements"]) or "none") + " |\n")
    path = write_result(args.out, "merge-check-", result, md, tag="merge-check")
    result["json_path"] = str(path)
    return result


if __name__ == "__main__":
    main()
