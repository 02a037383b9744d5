"""torch.compile trial: ft.py's training step, eager against compiled, on the same batches.

    python bench/compile_trial.py --dataset ../shared/data/glue --steps 20

Builds the model as ft.py does (4-bit base + LoRA, 8-bit AdamW, same seed) twice, once eager and
once with ``torch.compile`` (``--mode``: the whole PEFT model, or each decoder layer), trains both
on ft.py's first ``--steps`` length-grouped batches, and reports the loss curves, their largest
difference, compile time (the first steps) and steady-state seconds per step. Writes a JSON next to
the benchmark results. See README "Speed and memory" for the measured outcome.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(args, compiled: bool) -> dict:
    import bitsandbytes as bnb
    import torch
    from transformers import get_linear_schedule_with_warmup

    from bench.bench import tokenized_data, train_config, ft_plan, train_step
    from qlora_cls.data import TokenizedSplit
    from qlora_cls.modeling import add_lora, load_base_model

    cfg = train_config(args)
    model_path, tokenizer, spec, data = tokenized_data(cfg)
    batcher = TokenizedSplit(data["train"], tokenizer.pad_token_id, spec.is_regression)
    plan = ft_plan(batcher.lengths, cfg)
    torch.manual_seed(cfg.seed)
    model = add_lora(load_base_model(cfg, model_path, spec.num_labels, tokenizer.pad_token_id, {"": "cpu"}), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(trainable, lr=cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    forward = model
    if compiled:
        if args.mode == "layers":
            for layer in model.get_base_model().model.layers:
                layer.compile(dynamic=True)
        else:
            forward = torch.compile(model, dynamic=True)
    model.train()
    torch.manual_seed(cfg.seed)  # same dropout masks in both runs
    losses, seconds = [], []
    for rows in plan:
        batch = batcher(rows)
        start = time.perf_counter()
        loss = train_step(forward, batch, trainable, optimizer, scheduler, cfg.max_grad_norm)
        losses.append(float(loss))
        seconds.append(time.perf_counter() - start)
    return {"losses": losses, "seconds": seconds}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup_steps_excluded", type=int, default=4, help="first steps left out of the timing")
    p.add_argument("--mode", choices=("model", "layers"), default="model")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    # the fields bench.train_config reads
    args.model_dir, args.prompt, args.batch_size, args.eval_batch_size = None, "perfect", 8, 32
    args.lr, args.warmup_ratio, args.seed, args.max_length = 3e-4, 0.06, 42, 512
    args.gradient_checkpointing, args.max_train_samples, args.max_eval_samples = "false", None, None
    eager = run(args, False)
    try:
        compiled = run(args, True)
    except Exception as exc:  # report, do not hide: a failed compile is a result too
        compiled = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    k = args.warmup_steps_excluded
    result = {"started": datetime.now().isoformat(timespec="seconds"), "steps": args.steps, "mode": args.mode,
              "eager": eager, "compiled": compiled,
              "eager_s_per_step": sum(eager["seconds"][k:]) / max(len(eager["seconds"][k:]), 1)}
    if "losses" in compiled:
        result["compiled_s_per_step"] = sum(compiled["seconds"][k:]) / max(len(compiled["seconds"][k:]), 1)
        result["compile_overhead_s"] = sum(compiled["seconds"][:k]) - sum(eager["seconds"][:k])
        result["speedup"] = result["eager_s_per_step"] / result["compiled_s_per_step"]
        result["max_loss_diff"] = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile-trial-{args.mode}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("eager", "compiled")}, indent=2))
    if "error" in compiled:
        print("compiled run failed:", compiled["error"])
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
