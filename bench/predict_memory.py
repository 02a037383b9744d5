"""Does predict.py run in constant memory? Peak RSS on a small and a 10x larger file, side by side.

    OMP_NUM_THREADS=1 python bench/predict_memory.py --dataset ../shared/data/glue      # 10,000 and 100,000 rows

Builds a tiny random 4-bit Llama (the test suite's ``build_tiny_model``: 2 layers, hidden 64, the
SmolLM2 tokenizer), trains it for 2 steps with ft.py on MRPC (so it is a real run folder: 4-bit base,
LoRA and head through PEFT, the path predict.py takes for runs), writes CSV files of generated MRPC-like
rows (idx, sentence1, sentence2 of 5-30 words), and runs predict.py on each, each in its own process.
The peak resident set size of each process is read from the kernel (``os.wait4``'s rusage, not from
predict.py itself). The sizes run small, large, small, so drift between runs shows. Target: the large
file's peak within 10 % of the small file's. Writes ``bench/results/predict-memory-<stamp>.json``.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the cat dog sat ran on a mat park quickly red blue house river old new film good bad said company "
         "shares market year percent government police court people").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "sentence1", "sentence2"])
        for i in range(n):
            w.writerow([i, " ".join(rng.choices(WORDS, k=rng.randint(5, 30))),
                        " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))])


def run_predict(run: Path, inp: Path, out: Path, chunk_size: int, batch_size: int) -> dict:
    cmd = [sys.executable, str(REPO / "predict.py"), "--results_path", str(run), "--input", str(inp),
           "--output", str(out), "--chunk_size", str(chunk_size), "--batch_size", str(batch_size)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over every child so far)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"predict.py failed ({proc.returncode}):\n{err[-3000:]}")
    with open(out) as f:
        rows = sum(1 for _ in f) - 1
    return {"rows": rows, "seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "input_mib": inp.stat().st_size / 2 ** 20}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="nyu-mll/glue", help="GLUE (hub id or local folder) for the 2-step run")
    p.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--chunk_size", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model, tiny_args  # the suite's tiny model, not a second copy of it

    result = {"started": datetime.now().isoformat(timespec="seconds"), "settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "tiny")
        run = tmp / "run"
        subprocess.run([sys.executable, str(REPO / "ft.py"), *tiny_args(str(model), args.dataset, run, "--max_steps", "2")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        small, large = args.sizes
        files = {n: tmp / f"rows-{n}.csv" for n in (small, large)}
        for n, f in files.items():
            write_rows(f, n)
        for n in (small, large, small):
            out = tmp / f"out-{n}.csv"
            out.unlink(missing_ok=True)
            figures = run_predict(run, files[n], out, args.chunk_size, args.batch_size)
            result["runs"].append(figures)
            print(f"{figures['rows']:>8,} rows ({figures['input_mib']:.1f} MiB of CSV): peak RSS "
                  f"{figures['peak_rss_mib']:.0f} MiB, {figures['seconds']:.0f} s", flush=True)
    peaks = {}
    for r in result["runs"]:
        peaks.setdefault(r["rows"], []).append(r["peak_rss_mib"])
    ratio = max(peaks[large]) / min(peaks[small])
    result["large_over_small_peak_rss"] = ratio
    # The ratio hides a leak that is small beside the libraries' own memory: the growth per extra row says it.
    extra = (max(peaks[large]) - min(peaks[small])) * 2 ** 20
    result["peak_rss_growth_bytes_per_extra_row"] = extra / (large - small)
    result["target_met"] = ratio <= 1.10
    print(f"peak RSS {large:,} rows / {small:,} rows: {ratio:.3f} (target <= 1.10: "
          f"{'met' if result['target_met'] else 'NOT met'}); growth {extra / 2 ** 20:+.1f} MiB, "
          f"{result['peak_rss_growth_bytes_per_extra_row']:.1f} bytes per extra row")
    from bench.results_io import write_result
    write_result(args.out, "predict-memory-", result, tag="predict-memory")
    return result


if __name__ == "__main__":
    main()
