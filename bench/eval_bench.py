"""Evaluation only: the Trainer's predict() against ft.py's evaluation, plain and fast, on ONE model.

    OMP_NUM_THREADS=1 python bench/eval_bench.py --dataset ../shared/data/glue            # 408 MRPC examples
    python bench/eval_bench.py --results_path results/<run>    # that run's trained adapter instead of a fresh one

One process loads the 4-bit base + LoRA once (the run's adapter, or a fresh LoRA with random B so the
merge is not trivial) and evaluates the same validation examples at the same batch size with:

- ``trainer``: ``transformers.Trainer.predict()`` with ``DataCollatorWithPadding`` (the recipe's evaluation);
- ``plain``: ``qlora_cls.evaluation.predict(fast=False)``, ft.py's evaluation before the fast path;
- ``fast``: ``predict(fast=True)``: weights de-quantized once + LoRA merged, shared prefix reused.
- ``fast_stream``: the same with the residual stream in the compute dtype (``--eval_stream_dtype compute``
  of eval.py / predict.py); only differs from ``fast`` when the compute dtype is 16-bit.
- ``fast_unfused``: ``fast`` on a copy built by ``fast_eval.inference_copy`` alone, without the gated-MLP
  fusion that ``inference_model`` adds on a CPU (``fast`` / ``fast_unfused`` is what the fusion is worth).

Same model object, data, batch size and compute dtype for every arm, so the ratios measure the
evaluation paths only. It runs first thing in a fresh process, where the Trainer's ``predict()`` is slower
than after a training run (glibc returns large freed blocks to the system, so every large tensor
page-faults until training has grown the heap; docs/benchmarks.md "Where the evaluation time goes"); the ratio here
therefore flatters the fast path, and the evaluation target is ``make bench``'s one-model comparison
(``bench.same_model_eval``), measured after training. Arms run ``--rounds`` times in rotating order
(the machine is shared: a slow minute then hits every arm); the figure per arm is its best round. Writes
``bench/results/eval-<timestamp>.json`` and ``.md`` with examples/s, accuracy, and max |logit
difference| and argmax agreement of each arm against ``plain``.
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

ARMS = ("trainer", "plain", "fast", "fast_stream", "fast_unfused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--model_dir", default=None, help="base model; none = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--results_path", default=None, help="evaluate this run's adapter/ (else a fresh random LoRA)")
    p.add_argument("--prompt", default="perfect")
    p.add_argument("--eval_batch_size", type=int, default=32)
    p.add_argument("--max_eval_samples", type=int, default=None, help="none = the whole validation split")
    p.add_argument("--compute_dtype", default="auto", help="bnb_4bit_compute_dtype for every arm")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    import utils
    from bench.bench import tokenized_data, _machine, _scores
    from qlora_cls.config import TrainConfig
    from qlora_cls.data import TokenizedSplit
    from qlora_cls import fast_eval
    from qlora_cls.evaluation import predict
    from qlora_cls.pipeline import build_model

    args = parse_args(argv)
    if args.results_path:
        from qlora_cls.runs import load_run_config
        cfg, _ = load_run_config(Path(args.results_path))
        cfg.max_eval_samples = args.max_eval_samples
    else:
        cfg = TrainConfig(model_dir=args.model_dir, dataset=args.dataset, prompt=args.prompt,
                          max_eval_samples=args.max_eval_samples, bnb_4bit_compute_dtype=args.compute_dtype)
    cfg.max_train_samples = 8  # tokenized_data tokenizes the training split too; it is not used here
    accelerator = Accelerator()
    cfg.resolve_auto(accelerator.device.type)
    cfg.gradient_checkpointing = False
    model_path, tokenizer, spec, data = tokenized_data(cfg)
    val = data["validation"]
    batcher = TokenizedSplit(val, tokenizer, spec.is_regression)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, model_path, tokenizer, spec.num_labels, accelerator,
                        adapter_dir=str(Path(args.results_path) / "adapter") if args.results_path else None)
    if not args.results_path:
        with torch.no_grad():  # LoRA B starts at zero: give the merge something to merge
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    labels = np.asarray(val["labels"])
    collator = DataCollatorWithPadding(tokenizer)
    padded = []

    def counting(features):
        batch = collator(features)
        padded.append((int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())))
        return batch

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, data_collator=counting,
                          args=TrainingArguments(output_dir=tmp, per_device_eval_batch_size=args.eval_batch_size,
                                                 report_to="none", use_cpu=accelerator.device.type == "cpu",
                                                 dataloader_num_workers=0, disable_tqdm=True))
        trainer_val = val.remove_columns(["row", "idx"])

        def unfused():
            with torch.inference_mode():
                clone, counts = fast_eval.inference_copy(model)
            return clone, {"eval_fast_path": True, "eval_dequantized": "yes: inference_copy, no fusion",
                           **{f"eval_{k}": v for k, v in counts.items()}}

        def run(arm):
            start = time.perf_counter()
            if arm == "trainer":
                padded.clear()
                logits = trainer.predict(trainer_val).predictions
                extra = {"padding_efficiency": sum(a for a, _ in padded) / sum(b for _, b in padded)}
            else:
                logits, stats = predict(model, batcher, args.eval_batch_size, accelerator, fast=arm != "plain",
                                        stream_dtype="compute" if arm == "fast_stream" else "float32",
                                        prepared=unfused() if arm == "fast_unfused" else None)
                extra = {"padding_efficiency": stats["eval_padding_efficiency"],
                         **{k: v for k, v in stats.items() if k.startswith("eval_") and k not in (
                             "eval_examples_per_s", "eval_tokens_per_s", "eval_seconds", "eval_padding_efficiency")}}
            return np.asarray(logits, dtype=np.float32), time.perf_counter() - start, extra

        rounds = {a: [] for a in ARMS}
        logits, extras = {}, {}
        for r in range(args.rounds):
            order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]
            for arm in order:
                load = os.getloadavg()[0]
                out, seconds, extra = run(arm)
                logits[arm], extras[arm] = out, extra
                rounds[arm].append({"seconds": seconds, "load_average_1min": load})
                print(f"[eval-bench] round {r + 1} {arm}: {len(val) / seconds:.2f} examples/s "
                      f"(load {load:.1f})", flush=True)
    arms = {}
    for arm in ARMS:
        best = min(x["seconds"] for x in rounds[arm])
        arms[arm] = {"examples_per_s": len(val) / best, "seconds_best": best, "rounds": rounds[arm],
                     **_scores(spec, logits[arm], labels), **extras[arm],
                     "max_abs_logit_diff_vs_plain": float(np.abs(logits[arm] - logits["plain"]).max()),
                     "argmax_equal_to_plain": bool((logits[arm].argmax(1) == logits["plain"].argmax(1)).all())}
    ratios = {"fast_over_trainer": arms["fast"]["examples_per_s"] / arms["trainer"]["examples_per_s"],
              "plain_over_trainer": arms["plain"]["examples_per_s"] / arms["trainer"]["examples_per_s"],
              "fast_over_plain": arms["fast"]["examples_per_s"] / arms["plain"]["examples_per_s"],
              "fast_stream_over_trainer": arms["fast_stream"]["examples_per_s"] / arms["trainer"]["examples_per_s"],
              "fast_stream_over_fast": arms["fast_stream"]["examples_per_s"] / arms["fast"]["examples_per_s"],
              "fast_over_fast_unfused": arms["fast"]["examples_per_s"] / arms["fast_unfused"]["examples_per_s"]}
    result = {"started": datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
              "settings": {**vars(args), "compute_dtype": cfg.bnb_4bit_compute_dtype, "model": model_path,
                           "examples": len(val), "real_tokens": int(sum(val["length"])),
                           "adapter": "run adapter" if args.results_path else "fresh LoRA, B ~ N(0, 0.02)",
                           "target_modules": list(cfg.target_modules)},
              "arms": arms, "ratios": ratios,
              "target": {"fast_over_trainer": 2.0, "met": ratios["fast_over_trainer"] >= 2.0,
                         "met_with_stream_in_compute_dtype": ratios["fast_stream_over_trainer"] >= 2.0},
              "peak_memory_bytes": utils.peak_memory_bytes(accelerator.device)}
    from bench.results_io import write_result
    path = write_result(args.out, "eval-", result, markdown(result), tag="eval-bench")
    result["json_path"] = str(path)
    return result


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    names = {"trainer": "Trainer.predict()", "plain": "ft.py evaluation, plain (--fast_eval false)",
             "fast": "ft.py evaluation, fast (--fast_eval true)",
             "fast_stream": "fast, stream in compute dtype (--eval_stream_dtype compute)",
             "fast_unfused": "fast without the gated-MLP fusion (inference_copy alone)"}
    lines = [f"Evaluation benchmark {result['started']}: {s['examples']} validation examples ({s['real_tokens']} real "
             f"tokens), batch {s['eval_batch_size']}, {s['compute_dtype']} compute, {s['adapter']}; "
             f"{m.get('cpu_model', m.get('cpu'))}, {m.get('torch_threads')} torch thread(s); best of {s['rounds']} "
             f"round(s).", "",
             "| arm | examples/s | seconds | padding eff. | accuracy | F1 | max abs logit diff vs plain | argmax = plain |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for arm, a in result["arms"].items():
        lines.append(f"| {names[arm]} | {a['examples_per_s']:.2f} | {a['seconds_best']:.1f} | "
                     f"{a['padding_efficiency']:.3f} | {a.get('accuracy', float('nan')):.4f} | "
                     f"{a.get('f1', float('nan')):.4f} | {a['max_abs_logit_diff_vs_plain']:.2e} | "
                     f"{'yes' if a['argmax_equal_to_plain'] else 'NO'} |")
    r = result["ratios"]
    lines += ["", f"fast / Trainer.predict(): **{r['fast_over_trainer']:.2f}x** (>= 2 in a fresh process: "
                  f"{'yes' if result['target']['met'] else 'no'}; the target is make bench's one-model figure); "
                  f"with the stream in the compute dtype: "
                  f"**{r['fast_stream_over_trainer']:.2f}x** ("
                  f"{'yes' if result['target']['met_with_stream_in_compute_dtype'] else 'no'}); "
                  f"plain / Trainer: {r['plain_over_trainer']:.2f}x; "
                  f"fast / plain: {r['fast_over_plain']:.2f}x; fast / fast without the MLP fusion: "
                  f"{r['fast_over_fast_unfused']:.2f}x. Fast path: prefix "
                  f"{result['arms']['fast'].get('eval_prefix_tokens')} tokens, de-quantized once: "
                  f"{result['arms']['fast'].get('eval_dequantized')}, merged LoRA layers: "
                  f"{result['arms']['fast'].get('eval_merged_lora_layers')}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
