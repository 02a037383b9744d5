"""Per-example latency of a trained classifier: base model, unmerged adapter, merged model (make latency).

    make latency                                                   # trains a tiny run first when given none
    OMP_NUM_THREADS=1 python bench/latency.py --results_path results/<run> --calls 100
    python bench/latency.py --results_path R --bottleneck_results_path R2   # a bottleneck-adapter run you have

Arms, all on the run's own evaluation examples (cycled in dataset order, so lengths vary as in use),
loaded together in one process and timed call by call in turn (the same batch through each arm, then
the next batch), so a slow moment of a shared machine hits every arm alike:

- ``base``: the base model as ``eval.py --base_only`` builds it (4-bit when the run was, fresh head);
- ``adapter``: the run's adapter unmerged on that base (what ``eval.py`` runs);
- ``merged``: ``merge.py``'s folder (de-quantized base + merged adapter, float32) loaded with plain
  ``AutoModelForSequenceClassification``; ``merged_bf16``: the same merge stored in bf16 (``--dtype bfloat16``);
- ``bottleneck``: bottleneck adapters (``--method adapter``) of equal trainable size: the run
  ``--bottleneck_results_path`` names, or else one trained here for ``--train_steps`` on the same base
  and data with ``--param_budget`` = the LoRA run's trainable count (``none`` skips the arm).

Each arm: ``--warmup`` untimed calls, then ``--calls`` timed forward calls (>= 100) at batch 1 and at
batch 8, ``torch.inference_mode``; reported per call and per example (call / batch), median and p95.
Without ``--results_path`` a short run is trained first on the embedded model (``--train_steps``
optimizer steps on MRPC), so the command works on a fresh machine. Writes
``bench/results/latency-<timestamp>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from qlora_cls.latency import percentile  # noqa: E402  (nearest rank, as metrics.json's latency)

BATCHES = (1, 8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results_path", default=None, help="run folder written by ft.py; none = train a short one first")
    p.add_argument("--bottleneck_results_path", default=None,
                   help="a run with --method adapter (bottleneck adapters) of equal trainable size; default: train "
                        "one here with --param_budget = the run's trainable count; 'none' skips the arm")
    p.add_argument("--dataset", default="nyu-mll/glue", help="for the short run and when the run's data moved")
    p.add_argument("--train_steps", type=int, default=5, help="optimizer steps of the short run")
    p.add_argument("--calls", type=int, default=100, help="timed calls per arm and batch size (>= 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    p.add_argument("--examples", type=int, default=64, help="evaluation examples cycled through")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    if args.calls < 100:
        p.error(f"--calls must be >= 100 (a p95 of fewer calls is one or two samples), got {args.calls}")
    return args


def time_calls(forwards: dict, batcher, batch: int, calls: int, warmup: int) -> dict:
    """Per-call times of every arm, interleaved call by call: a slow moment of a shared machine hits all arms."""
    import torch
    n = len(batcher)
    seconds = {name: [] for name in forwards}
    with torch.inference_mode():
        for i in range(warmup + calls):
            rows = [(i * batch + j) % n for j in range(batch)]
            b = batcher(rows)
            for name, forward in forwards.items():
                t0 = time.perf_counter()
                forward(b["input_ids"], b["attention_mask"])
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - t0)
    out = {}
    for name, values in seconds.items():
        ms = [1000 * s for s in values]
        out[name] = {"calls": calls, "batch": batch, "median_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
                     "median_ms_per_example": percentile(ms, 50) / batch,
                     "p95_ms_per_example": percentile(ms, 95) / batch}
    return out


def short_run(args, where: Path) -> Path:
    import ft
    run = where / "run"
    ft.main(["--dataset", args.dataset, "--results_path", str(run), "--max_steps", str(args.train_steps),
             "--max_train_samples", "64", "--max_eval_samples", str(args.examples), "--log_every", "1"])
    return run


def short_bottleneck_run(args, cfg, trainable: int, where: Path) -> Path:
    """Bottleneck adapters on the run's base and data, at most as many trainable parameters as the run."""
    import ft
    run = where / "bottleneck"
    argv = ["--dataset", cfg.dataset, "--results_path", str(run), "--method", "adapter", "--param_budget",
            str(trainable), "--max_steps", str(args.train_steps), "--max_train_samples", "64", "--max_eval_samples",
            str(args.examples), "--log_every", "1", "--latency_calls", "0", "--prompt", cfg.prompt]
    if cfg.model_dir:
        argv += ["--model_dir", cfg.model_dir]
    if cfg.task:
        argv += ["--task", cfg.task]
    ft.main(argv)
    return run


def main(argv=None) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from bench.bench import _machine
    from qlora_cls.runs import load_run_config
    from qlora_cls.data import DataSource
    from qlora_cls.merging import merge_run, run_method
    from qlora_cls.pipeline import build_model, prepare_data, tokenizer_for
    from qlora_cls.prompts import parse_template

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(args.results_path) if args.results_path else short_run(args, tmp)
        cfg, records = load_run_config(run)
        if not Path(cfg.dataset).exists() and Path(args.dataset).exists():
            cfg.dataset = args.dataset
        resolved = records["resolved"]
        split = resolved.get("eval_split", "validation")
        accelerator = Accelerator()
        cfg.resolve_auto(accelerator.device.type)
        model_path, tokenizer = tokenizer_for(cfg)
        template = parse_template(resolved.get("prompt_name", "run"),
                                  (run / "prompt.txt").read_text(encoding="utf-8").rstrip("\r\n"))
        data = prepare_data(DataSource.from_config(cfg), template, tokenizer, [split], cfg.max_length,
                            {split: args.examples}, accelerator)
        batcher = data.batchers[split]
        num_labels = data.task.spec.num_labels
        notes = {}

        def run_model(model):
            model.eval()
            return lambda ids, mask: model(input_ids=ids.to(accelerator.device),
                                           attention_mask=mask.to(accelerator.device)).logits

        forwards = {}
        set_seed(cfg.seed)
        forwards["base"] = run_model(build_model(cfg, model_path, tokenizer, num_labels, accelerator, base_only=True))
        set_seed(cfg.seed)
        forwards["adapter"] = run_model(build_model(cfg, model_path, tokenizer, num_labels, accelerator,
                                                    adapter_dir=str(run / "adapter")))
        merged_dir = merge_run(cfg, records, run, tmp / "merged")
        from transformers import AutoModelForSequenceClassification
        forwards["merged"] = run_model(AutoModelForSequenceClassification.from_pretrained(merged_dir)
                                       .to(accelerator.device))
        # The same merge stored in bf16 (merge.py --dtype bfloat16): on a CPU whose bf16 GEMMs are fast the
        # float32 merged model can be slower than the 4-bit adapter computing in bf16.
        merged_bf16 = merge_run(cfg, records, run, tmp / "merged-bf16", dtype="bfloat16")
        forwards["merged_bf16"] = run_model(AutoModelForSequenceClassification.from_pretrained(
            merged_bf16, dtype=torch.bfloat16).to(accelerator.device))
        if args.bottleneck_results_path == "none":
            notes["bottleneck"] = "skipped: --bottleneck_results_path none"
        elif args.bottleneck_results_path is None and cfg.train_file:
            notes["bottleneck"] = "skipped: the run trained on local files; give --bottleneck_results_path"
        else:
            b_run = Path(args.bottleneck_results_path) if args.bottleneck_results_path else \
                short_bottleneck_run(args, cfg, resolved["parameters"]["trainable"], tmp)
            b_cfg, b_records = load_run_config(b_run)
            if run_method(b_records["config"]) != "adapter":
                notes["bottleneck"] = (f"skipped: {b_run} has method {run_method(b_records['config'])!r}, "
                                       f"not 'adapter' (bottleneck adapters)")
            else:
                b_cfg.resolve_auto(accelerator.device.type)
                set_seed(b_cfg.seed)
                forwards["bottleneck"] = run_model(build_model(b_cfg, model_path, tokenizer, num_labels,
                                                               accelerator, adapter_dir=str(b_run / "adapter")))
                notes["bottleneck"] = (f"trainable parameters {b_records['resolved']['parameters']['trainable']:,} "
                                       f"vs the LoRA run's {resolved['parameters']['trainable']:,}"
                                       + ("" if args.bottleneck_results_path else
                                          f" (trained here, {args.train_steps} steps)"))
        if "bottleneck" not in forwards:
            print(f"[latency] bottleneck: {notes['bottleneck']}", flush=True)
        arms = {name: {} for name in forwards}
        for b in BATCHES:
            for name, cell in time_calls(forwards, batcher, b, args.calls, args.warmup).items():
                arms[name][f"batch_{b}"] = cell
                print(f"[latency] {name}, batch {b}: median {cell['median_ms']:.1f} ms, p95 {cell['p95_ms']:.1f} ms",
                      flush=True)
    result = {"started": datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
              "settings": {**vars(args), "run": str(run) if args.results_path else "short run (deleted)",
                           "compute_dtype": cfg.bnb_4bit_compute_dtype, "model": model_path,
                           "examples": len(batcher), "mean_tokens": sum(batcher.lengths) / len(batcher),
                           "load_in_4bit": cfg.load_in_4bit, "threads": torch.get_num_threads(),
                           "load_average_1min": os.getloadavg()[0]},
              "arms": arms, "notes": notes}
    from bench.results_io import write_result
    path = write_result(args.out, "latency-", result, markdown(result), tag="latency")
    result["json_path"] = str(path)
    return result


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    names = {"base": "base model (untrained head)" + (", 4-bit" if s["load_in_4bit"] else ""),
             "adapter": "adapter, unmerged" + (" (4-bit base)" if s["load_in_4bit"] else ""),
             "merged": "merged model (merge.py, float32)", "merged_bf16": "merged model (merge.py --dtype bfloat16)",
             "bottleneck": "bottleneck adapter (equal trainable size)"}
    lines = [f"Latency {result['started']}: {s['model']}, {s['compute_dtype']} compute, {s['examples']} evaluation "
             f"examples cycled (mean {s['mean_tokens']:.1f} tokens), {s['calls']} timed calls per cell after "
             f"{s['warmup']} warm-up; {m.get('cpu_model', m.get('cpu'))}, {s['threads']} torch thread(s).", "",
             "| arm | batch 1: median ms | batch 1: p95 ms | batch 8: median ms/example | batch 8: p95 ms/example "
             "| batch 8: median ms/call |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for arm, label in names.items():
        a = result["arms"].get(arm)
        if a is None:
            lines.append(f"| {label} | {result['notes'].get(arm, 'skipped')} | | | | |")
            continue
        b1, b8 = a["batch_1"], a["batch_8"]
        lines.append(f"| {label} | {b1['median_ms']:.1f} | {b1['p95_ms']:.1f} | {b8['median_ms_per_example']:.1f} | "
                     f"{b8['p95_ms_per_example']:.1f} | {b8['median_ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
