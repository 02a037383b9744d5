"""Where a training step's time goes: forward / backward / clip / optimizer, by sequence length, + top ops.

    python bench/profile_step.py --lengths 16 48 96 --repeats 3

Builds the model exactly as ft.py does (4-bit base + LoRA, 8-bit AdamW, float32 compute on CPU) and
times each phase of a step on batches of ``--batch_size`` x L tokens without padding, so a fixed
per-step cost (weights de-quantized in every forward and backward, optimizer) shows as the time at
small L. Also times inference forwards (evaluation) and prints the torch.profiler top operators of
one step. Writes a JSON next to the benchmark results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    import bitsandbytes as bnb
    import torch

    from qlora_cls.config import TrainConfig
    from qlora_cls.modeling import add_lora, embedded_model_dir, load_base_model, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_batch_size", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 48, 96])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient_checkpointing", default="false")
    p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="bnb_4bit_compute_dtype (ft.py's default on CPU is float32)")
    p.add_argument("--fast_cpu_dropout", default="true", choices=("true", "false"), help="as ft.py's flag")
    p.add_argument("--no_profile", action="store_true", help="skip the torch.profiler table")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    path = args.model_dir or str(embedded_model_dir())
    cfg = TrainConfig(model_dir=path, bnb_4bit_compute_dtype=args.compute_dtype,
                      gradient_checkpointing=args.gradient_checkpointing == "true",
                      fast_cpu_dropout=args.fast_cpu_dropout == "true")
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg, path, 2, tok.pad_token_id, {"": "cpu"}), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    result = {"started": datetime.now().isoformat(timespec="seconds"), "settings": vars(args), "train": {}, "eval": {}}

    def batch(b, n):
        x = torch.randint(100, vocab - 1, (b, n))
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.randint(0, 2, (b,))}

    def step(data, out):
        t0 = time.perf_counter()
        loss = model(**data).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for k, v in zip(("forward", "backward", "clip", "optimizer"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            out.setdefault(k, []).append(v)

    model.train()
    step(batch(args.batch_size, 16), {})  # warm-up (optimizer state, first-call costs)
    for n in args.lengths:
        times: dict = {}
        for _ in range(args.repeats):
            step(batch(args.batch_size, n), times)
        result["train"][n] = {k: min(v) for k, v in times.items()}
        result["train"][n]["total"] = sum(result["train"][n].values())
        print(f"train {args.batch_size}x{n}: " + ", ".join(f"{k} {v:.3f}s" for k, v in result["train"][n].items()),
              flush=True)
    model.eval()
    with torch.inference_mode():
        for n in args.lengths:
            ts = []
            for _ in range(args.repeats):
                data = batch(args.eval_batch_size, n)
                t0 = time.perf_counter()
                model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
                ts.append(time.perf_counter() - t0)
            result["eval"][n] = min(ts)
            print(f"eval {args.eval_batch_size}x{n}: forward {min(ts):.3f}s", flush=True)
    model.train()
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batch(args.batch_size, args.lengths[-1]), {})
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(table)
        result["profile_top_ops"] = table
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-step-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
