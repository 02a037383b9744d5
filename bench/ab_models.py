"""Same batches, interleaved: the Trainer arm's model against ft.py's, with fast and with torch dropout.

    python bench/ab_models.py --dataset ../shared/data/glue --steps 24

The benchmark runs its arms one after another, so a machine that speeds up or slows down between arms
moves their ratios. This script builds the three models in one process (the Trainer recipe's
``from_pretrained`` + ``prepare_model_for_kbit_training`` + ``get_peft_model``; ft.py's
``load_base_model`` + ``add_lora`` with ``--fast_cpu_dropout`` true and false) and gives each of
ft.py's first ``--steps`` batches to all three in turn (order reversed every step), so drift hits
them alike. It prints the summed step times (first two steps left out) and their ratios. The model
built first ran up to 4 % faster here whichever it was: ``--trainer_model_last`` swaps the order.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from bench.bench import tokenized_data, train_config, ft_plan
    from qlora_cls.data import TokenizedSplit
    from qlora_cls.modeling import DTYPE, add_lora, disable_cpu_weight_repacking, load_base_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--trainer_model_last", action="store_true",
                   help="build the Trainer recipe's model after ft.py's two (the model built first ran up to 4 %% "
                        "faster here, whichever it was)")
    args = p.parse_args(argv)
    # the fields bench.train_config reads
    args.model_dir, args.prompt, args.batch_size, args.eval_batch_size = None, "perfect", 8, 32
    args.lr, args.warmup_ratio, args.seed, args.max_length = 3e-4, 0.06, 42, 512
    args.gradient_checkpointing, args.max_train_samples, args.max_eval_samples = "false", None, None
    cfg = train_config(args)
    model_path, tok, spec, data = tokenized_data(cfg)
    batcher = TokenizedSplit(data["train"], tok.pad_token_id, spec.is_regression)
    plan = ft_plan(batcher.lengths, cfg)
    compute = DTYPE[cfg.bnb_4bit_compute_dtype]

    def trainer_recipe_model():
        trainer_model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=spec.num_labels, dtype=compute, device_map={"": "cpu"},
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))
        trainer_model.config.pad_token_id, trainer_model.config.use_cache = tok.pad_token_id, False
        disable_cpu_weight_repacking(trainer_model)
        trainer_model = get_peft_model(
            prepare_model_for_kbit_training(trainer_model, use_gradient_checkpointing=False),
            LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                       target_modules=["q_proj", "v_proj"]))
        return trainer_model

    models = {} if args.trainer_model_last else {"trainer_model": trainer_recipe_model()}
    for name, fast in (("ft_model", True), ("ft_model_torch_dropout", False)):
        c = dataclasses.replace(cfg, fast_cpu_dropout=fast)
        models[name] = add_lora(load_base_model(c, model_path, spec.num_labels, tok.pad_token_id, {"": "cpu"}), c)
    if args.trainer_model_last:
        models["trainer_model"] = trainer_recipe_model()
    optimizers = {k: bnb.optim.AdamW8bit([q for q in m.parameters() if q.requires_grad], lr=cfg.lr)
                  for k, m in models.items()}
    seconds: dict = {k: [] for k in models}
    for m in models.values():
        m.train()
    for i, rows in enumerate(plan[:args.steps]):
        batch = batcher(rows)
        for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
            start = time.perf_counter()
            models[name](**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            seconds[name].append(time.perf_counter() - start)
    total = {k: sum(v[2:]) for k, v in seconds.items()}
    for k, v in seconds.items():
        print(f"{k}: {total[k]:.2f} s over steps 3-{len(v)}, median step {statistics.median(v):.3f} s")
    ratios = {"trainer_model_over_ft_model": total["trainer_model"] / total["ft_model"],
              "ft_torch_dropout_over_ft_model": total["ft_model_torch_dropout"] / total["ft_model"],
              "trainer_model_over_ft_torch_dropout": total["trainer_model"] / total["ft_model_torch_dropout"]}
    for k, v in ratios.items():
        print(f"time {k.replace('_over_', ' / ')}: {v:.3f}")
    return {"seconds": seconds, "ratios": ratios}


if __name__ == "__main__":
    main()
