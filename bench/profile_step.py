"""Where a training step's time goes: forward / backward / clip / optimizer, by sequence length, + top ops.

    python bench/profile_step.py --lengths 16 48 96 --repeats 3

Builds the model exactly as ft.py does (4-bit base + LoRA, 8-bit AdamW, compute dtype as ft.py's auto) and
times each phase of a step on batches of ``--batch_size`` x L tokens without padding, so a fixed
per-step cost (weights de-quantized in every forward and backward, optimizer) shows as the time at
small L. Also times inference forwards (evaluation) and prints the torch.profiler top operators of
one step. Writes a JSON next to the benchmark results.

Whether bf16 compute beats float32 depends on the CPU and its libraries, not on a flag (qlora_cls/hardware.py
measures it for ``auto``): with AMX-BF16 bf16 GEMMs ran ~6x fp32's GFLOP/s, on an AVX512-BF16 AMD EPYC
without AMX ~8x (MKL's fp32 is slow there), on an AMX Intel capped at AVX512-BF16 0.6x, with AVX512 and no
BF16 on oneDNN's emulation 0.2x, and with no AVX512 (or oneDNN off) on torch's reference kernel 0.02-0.1x.
``--onednn_max_isa`` caps the instruction set oneDNN may use (its ONEDNN_MAX_CPU_ISA), so the slow
condition can be shown on a CPU that has bf16; ``--mkldnn false`` switches oneDNN off. The
GEMM table (``--gemm``) times the two matrix products of a 4-bit linear layer, forward A @ W^T and
backward dY @ W, in fp32 and bf16, which is where the difference is.

    python bench/profile_step.py --compute_dtype bfloat16 --gemm                       # AMX-BF16
    python bench/profile_step.py --compute_dtype bfloat16 --gemm --onednn_max_isa AVX2  # the slow case
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_batch_size", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 48, 96])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient_checkpointing", default="false")
    p.add_argument("--compute_dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="bnb_4bit_compute_dtype, resolved as ft.py resolves it")
    p.add_argument("--load_dtype", default=None, choices=("float32", "bfloat16"),
                   help="dtype the model is loaded in; none = the compute dtype, as ft.py does")
    p.add_argument("--onednn_max_isa", default=None,
                   help="cap oneDNN's instruction set (ONEDNN_MAX_CPU_ISA: AVX2, AVX512_CORE, AVX512_CORE_BF16, "
                        "AVX512_CORE_AMX, ...) to show bf16 on a CPU without native bf16")
    p.add_argument("--mkldnn", default="true", choices=("true", "false"), help="false: torch.backends.mkldnn off")
    p.add_argument("--threads", type=int, default=None, help="torch threads; none = torch's default")
    p.add_argument("--gemm", action="store_true", help="also time fp32/bf16 GEMMs of the model's layer shapes")
    p.add_argument("--skip_steps", action="store_true", help="only the GEMM table (with --gemm)")
    p.add_argument("--fast_cpu_dropout", default="true", choices=("true", "false"), help="as ft.py's flag")
    p.add_argument("--no_profile", action="store_true", help="skip the torch.profiler table")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    if args.onednn_max_isa:  # read by oneDNN when torch first uses it: set before torch is imported
        if "torch" in sys.modules:
            p.error("--onednn_max_isa must be set before torch is imported (run this script on its own)")
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.onednn_max_isa
    import bitsandbytes as bnb
    import torch

    from qlora_cls.config import TrainConfig
    from qlora_cls.hardware import cpu_bf16_support
    from qlora_cls.modeling import DTYPE, add_lora, embedded_model_dir, load_base_model, load_tokenizer

    torch.backends.mkldnn.enabled = args.mkldnn == "true"
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model_dir or str(embedded_model_dir())
    cfg = TrainConfig(model_dir=path, bnb_4bit_compute_dtype=args.compute_dtype,
                      gradient_checkpointing=args.gradient_checkpointing == "true",
                      fast_cpu_dropout=args.fast_cpu_dropout == "true")
    cfg.resolve_compute_dtype("cpu")
    result = {"started": datetime.now().isoformat(timespec="seconds"), "settings": vars(args),
              "compute_dtype": cfg.bnb_4bit_compute_dtype, "load_dtype": args.load_dtype or cfg.bnb_4bit_compute_dtype,
              "machine": {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "onednn_bf16_usable": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                          "mkldnn_enabled": torch.backends.mkldnn.enabled, **cpu_bf16_support()},
              "train": {}, "eval": {}}
    print("settings:", json.dumps({k: result[k] for k in ("compute_dtype", "load_dtype", "machine")}), flush=True)
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    if args.gemm:
        result["gemm_gflops"] = gemm_table(torch, path, args.batch_size * max(args.lengths))
    if args.skip_steps:
        return _write(result, args.out, "profile-gemm")
    base_cfg = cfg
    if args.load_dtype:  # load in one dtype, compute in another: is the load dtype what matters?
        import dataclasses
        base_cfg = dataclasses.replace(cfg, bnb_4bit_compute_dtype=args.load_dtype)
    model = load_base_model(base_cfg, path, 2, tok.pad_token_id, {"": "cpu"})
    if base_cfg is not cfg:
        import bitsandbytes.nn
        for m in model.modules():
            if isinstance(m, bitsandbytes.nn.Linear4bit):
                m.compute_dtype = DTYPE[cfg.bnb_4bit_compute_dtype]
    model = add_lora(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(trainable, lr=1e-4)
    vocab = model.config.vocab_size

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
    return _write(result, args.out, "profile-step")


def gemm_table(torch, model_path: str, tokens: int) -> dict:
    """GFLOP/s of the model's linear shapes, forward (x @ W^T) and backward (dY @ W), fp32 and bf16."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_path)
    shapes = {"q_proj": (c.hidden_size, c.hidden_size), "mlp up": (c.intermediate_size, c.hidden_size),
              "mlp down": (c.hidden_size, c.intermediate_size)}
    table = {}
    for name, (n, k) in shapes.items():
        for dtype in ("float32", "bfloat16"):
            dt = getattr(torch, dtype)
            x, w, dy = torch.randn(tokens, k, dtype=dt), torch.randn(n, k, dtype=dt), torch.randn(tokens, n, dtype=dt)
            flop = 2 * tokens * n * k
            for phase, fn in (("forward x@W^T", lambda: torch.nn.functional.linear(x, w)),
                              ("backward dY@W", lambda: torch.matmul(dy, w))):
                fn()
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t0)
                table[f"{name} {tokens}x{k}x{n} {phase} {dtype}"] = flop / best / 1e9
                print(f"gemm {name} {tokens}x{k}x{n} {phase} {dtype}: {flop / best / 1e9:.1f} GFLOP/s", flush=True)
    return table


def _write(result: dict, out: str, prefix: str) -> dict:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
