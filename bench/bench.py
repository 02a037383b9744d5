"""Benchmark: ft.py against the transformers Trainer + PEFT QLoRA recipe, on the same model, data and steps.

    make bench                                   # BENCH_STEPS=80 (~25 min, one core), DATASET=../shared/data/glue
    python bench/bench.py --steps 100 --dataset ../shared/data/glue

Arms, run one after another, each in its own subprocess (clean peak memory, no shared caches):

1. ``trainer_default_bf16``: ``transformers.Trainer`` + PEFT, random sampling, bf16 compute: the
   recipe as users write it (the reference's ``bnb_4bit_compute_dtype=torch.bfloat16``).
2. ``trainer_grouped_bf16``: the same with ``train_sampling_strategy="group_by_length"``.
3. ``trainer_default``, 4. ``trainer_grouped``: the same two in float32 compute (ft.py's CPU default
   before bf16 was found fast on CPUs with AMX; kept so earlier results stay comparable).
5. ``ft``: ``ft.py`` with its defaults (``ft.main`` called in the subprocess; compute dtype ``auto``).
6. ``dense``: the same model + LoRA + optimizer doing forward+backward+step on batches with no padding
   and the same real token count as ft.py's batches (each batch becomes ``B`` sequences of
   ``round(real tokens / B)`` of its own tokens, built before the clock starts), in the dtype
   ``auto`` picks (the fastest here): no data loading, no padding, no bookkeeping, so it bounds what
   a training loop that runs every token of every row can reach. ft.py's shared prompt prefix
   (``--share_prefix``) runs the prefix once per batch instead, so it can pass this bound.

The targets compare ``ft`` with the bf16 Trainer arms and the dense limit; the float32 Trainer arms
give "other ratios".

Optional (``--arms ...,ft_torch_dropout``): ``ft.py --fast_cpu_dropout false``, to check the fast CPU
LoRA dropout side by side: its speed-up, and that the loss curve (means over windows of steps) and
the accuracy stay within noise of torch's dropout.

All arms: the same 4-bit NF4 base (double quantization; compute dtype per arm as above), LoRA r=8/alpha 16/
dropout 0.1 on q_proj,v_proj, head trained in full, 8-bit AdamW, lr 3e-4 with linear warm-up over
6 % of the steps, gradient clipping 1.0, batch 8, the same tokenization (the toolkit's prompt
rendering and truncation), and the CPU repack guard of ``qlora_cls.modeling`` (without it the
Trainer's first ``evaluate()`` would repack the 4-bit weights and be ~5x slower; the guard makes the
comparison fair and does not change the Trainer's results). Training time is the training loop only
(model loading excluded): Trainer ``on_train_begin`` -> ``on_train_end``, ft.py ``train_seconds``,
the dense loop's own clock. Real tokens = non-padding tokens of the batches actually trained on.
Evaluation is the whole validation split: ``trainer.predict()`` (the ``evaluate()`` loop that also
returns the logits) and ft.py's evaluation after its last step, each on its own arm's model. The
evaluation target is measured on ONE model instead (``same_model_eval``): after its training, the
``trainer_default_bf16`` arm times its ``predict()`` and ft.py's evaluation on its own trained model,
in rotating rounds, and checks that both give the same argmax. Peak memory is the arm's
process peak RSS on CPU (``ru_maxrss``), peak allocated CUDA memory on a GPU (for the
``trainer_default_bf16`` arm: up to its ``predict()``, before that comparison). Besides total tokens /
training seconds, each arm records per-step times and the median of per-step throughputs, which a
step slowed down by another process on a shared machine does not move, and the load average.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARMS = ("trainer_default_bf16", "trainer_grouped_bf16", "trainer_default", "trainer_grouped", "ft", "dense")
TRAINER_ARMS = {  # arm: (group_by_length, compute dtype)
    "trainer_default_bf16": (False, "bfloat16"), "trainer_grouped_bf16": (True, "bfloat16"),
    "trainer_default": (False, "float32"), "trainer_grouped": (True, "float32"),
}
OPTIONAL_ARMS = ("ft_torch_dropout",)
SAME_MODEL_ARM = "trainer_default_bf16"  # its trained model also times ft.py's evaluation (same_model_eval)
LOSS_WINDOW = 25  # steps per window when loss curves are compared
TARGETS = {  # name: (ratio key, minimum); the Trainer as users write it computes in bf16
    "train tokens/s vs Trainer default (bf16)": ("train_tokens_per_s_ft_over_trainer_default_bf16", 1.25),
    "train tokens/s vs Trainer grouped (bf16)": ("train_tokens_per_s_ft_over_trainer_grouped_bf16", 1.0),
    "train tokens/s vs dense limit": ("train_tokens_per_s_ft_over_dense", 0.85),
    "same, median step: vs Trainer default (bf16)": ("train_tokens_per_s_median_step_ft_over_trainer_default_bf16", 1.25),
    "same, median step: vs Trainer grouped (bf16)": ("train_tokens_per_s_median_step_ft_over_trainer_grouped_bf16", 1.0),
    "same, median step: vs dense limit": ("train_tokens_per_s_median_step_ft_over_dense", 0.85),
    "eval examples/s vs Trainer predict(), same model, best of 2 rotating rounds":
        ("eval_examples_per_s_ft_over_trainer_predict_same_model", 2.0),
    "eval argmax agreement with Trainer predict(), same model": ("eval_argmax_agreement_ft_vs_trainer_predict_same_model", 1.0),
    "accuracy minus Trainer default (bf16, points)": ("accuracy_points_ft_minus_trainer_default_bf16", -1.0),
    "accuracy minus Trainer grouped (bf16, points)": ("accuracy_points_ft_minus_trainer_grouped_bf16", -1.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per arm")
    p.add_argument("--dataset", default="nyu-mll/glue", help="GLUE hub id or local folder in hub layout")
    p.add_argument("--model_dir", default=None, help="base model; none = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--prompt", default="perfect", help="prompt template")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_batch_size", type=int, default=32, help="same for every arm")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup_ratio", type=float, default=0.06)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--gradient_checkpointing", choices=("auto", "true", "false"), default="auto",
                   help="same for every arm; auto = ft.py's rule on CPU (off: RAM is plenty, recomputation only "
                        "costs time), on on a GPU (the reference)")
    p.add_argument("--max_train_samples", type=int, default=None, help="(tests) use only the first N training examples")
    p.add_argument("--max_eval_samples", type=int, default=None, help="(tests) evaluate only the first N examples")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated subset of {','.join(ARMS + OPTIONAL_ARMS)}")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for <timestamp>.json and .md")
    p.add_argument("--in_process", action="store_true",
                   help="(tests) run the arms in this process: faster start, but peak memory is then cumulative")
    p.add_argument("--run_arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm in this process
    p.add_argument("--arm_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [a for a in args.arms.split(",") if a not in ARMS + OPTIONAL_ARMS]
    if bad or args.steps <= 0:
        p.error(f"unknown arm(s) {bad}" if bad else "--steps must be > 0")
    return args


# -- shared by the arms ------------------------------------------------------------------------------
def train_config(args, compute_dtype: str = "auto"):
    from qlora_cls.config import TrainConfig
    cfg = TrainConfig(model_dir=args.model_dir, dataset=args.dataset, prompt=args.prompt, batch_size=args.batch_size,
                      eval_batch_size=args.eval_batch_size, lr=args.lr, warmup_ratio=args.warmup_ratio, seed=args.seed,
                      max_length=args.max_length, gradient_checkpointing=_checkpointing(args),
                      max_steps=args.steps, max_train_samples=args.max_train_samples,
                      max_eval_samples=args.max_eval_samples, bnb_4bit_compute_dtype=compute_dtype)
    import torch
    cfg.resolve_auto("cuda" if torch.cuda.is_available() else "cpu")
    return cfg


def _checkpointing(args) -> bool:
    """One value for every arm: ``auto`` is ft.py's rule on a CPU (off); on a GPU the reference's (on)."""
    if args.gradient_checkpointing == "auto":
        import torch
        return torch.cuda.is_available()
    return args.gradient_checkpointing == "true"


def tokenized_data(cfg):
    """Tokenized train/validation (HF datasets with input_ids, labels, length), as ft.py tokenizes them."""
    from qlora_cls.data import DataSource, load_task_data, tokenize
    from qlora_cls.modeling import load_tokenizer, resolve_model_dir
    from qlora_cls.pipeline import select
    from qlora_cls.prompts import load_template
    model_path = resolve_model_dir(cfg.model_dir)
    tokenizer = load_tokenizer(model_path)
    task = load_task_data(DataSource.from_config(cfg), ["train", "validation"])
    template = load_template(cfg.prompt, cfg.glue_task).bind(task.spec.text_columns, task.label_names)
    out = {}
    for split, n in (("train", cfg.max_train_samples), ("validation", cfg.max_eval_samples)):
        out[split] = tokenize(select(task.splits[split], n), template, tokenizer, cfg.label_column, cfg.max_length,
                              task.spec.is_regression)
    return model_path, tokenizer, task.spec, out


def ft_plan(lengths, cfg):
    """ft.py's first ``steps`` micro-batches (epoch 0, one process): the dense arm reuses them."""
    from qlora_cls.batching import LengthGroupedBatchSampler
    sampler = LengthGroupedBatchSampler(lengths, cfg.batch_size, cfg.seed)
    plan = []
    epoch = 0
    while len(plan) < cfg.max_steps:
        plan += sampler.batches(epoch)
        epoch += 1
    return plan[:cfg.max_steps]


def _peak_memory():
    import utils
    import torch
    return utils.peak_memory_bytes(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _scores(spec, logits, labels):
    from qlora_cls.metrics import compute_metrics
    import numpy as np
    return compute_metrics(spec, np.asarray(logits), np.asarray(labels))


# -- arm 1/2: the transformers Trainer recipe -----------------------------------------------------------
class _CountingCollator:
    """DataCollatorWithPadding that also records real and padded token counts of each batch it builds."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []  # (examples, real tokens, padded tokens)

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.batches.append((int(mask.shape[0]), int(mask.sum()), int(mask.numel())))
        return batch


def run_trainer(args, grouped: bool, compute_dtype: str, state_dir: Optional[Path] = None,
                compare_eval: bool = False) -> dict:
    """The Trainer recipe; with ``state_dir`` it checkpoints there every 50 steps and resumes from the last
    checkpoint it finds (bench/parity.py's runs span sessions), else it runs in a temporary folder.
    ``compare_eval``: also time ft.py's evaluation on this model against predict() (``same_model_eval``)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForSequenceClassification, BitsAndBytesConfig, DataCollatorWithPadding,
                              Trainer, TrainerCallback, TrainingArguments, set_seed)

    from qlora_cls.modeling import DTYPE, disable_cpu_weight_repacking

    cfg = train_config(args, compute_dtype)
    model_path, tokenizer, spec, data = tokenized_data(cfg)
    compute = DTYPE[cfg.bnb_4bit_compute_dtype]
    on_gpu = torch.cuda.is_available()
    # The recipe as its tutorials write it; set_seed first (as run_glue.py does), so the seed also fixes the
    # fresh head's initialisation: TrainingArguments(seed=) seeds only from the Trainer's creation on.
    set_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=spec.num_labels, dtype=compute, device_map={"": 0 if on_gpu else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    disable_cpu_weight_repacking(model)  # the same CPU guard as ft.py (see the module docstring)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout, target_modules=["q_proj", "v_proj"]))
    train = data["train"].remove_columns(["row", "idx"])
    val = data["validation"].remove_columns(["row", "idx"])
    collator = _CountingCollator(DataCollatorWithPadding(tokenizer))
    clock = {}
    seconds_file = Path(state_dir) / "train_seconds.json" if state_dir is not None else None

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            clock.setdefault("steps", []).append(time.perf_counter())

        def on_save(self, args, state, control, **k):
            # The seconds up to this checkpoint, so a resumed run reports all of its training time.
            from qlora_cls.files import atomic_write_json
            atomic_write_json(seconds_file, {"step": state.global_step,
                                             "seconds": earlier + time.perf_counter() - clock["start"]})

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = sorted(Path(state_dir).glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1])) \
            if state_dir is not None else []
        resume = bool(checkpoints)
        earlier = 0.0  # training seconds of the processes before this one (0 for a fresh run)
        if resume:
            step = int(checkpoints[-1].name.split("-")[1])
            saved = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
            if saved.get("step") != step:
                raise SystemExit(f"{state_dir}: {checkpoints[-1].name} has no matching train_seconds.json "
                                 f"(it records step {saved.get('step')}); its training time is unknown")
            earlier = saved["seconds"]
        targs = TrainingArguments(
            output_dir=str(state_dir or tmp), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
            learning_rate=cfg.lr, warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps), lr_scheduler_type="linear",
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="adamw_bnb_8bit",
            max_steps=cfg.max_steps, train_sampling_strategy="group_by_length" if grouped else "random",
            logging_strategy="no", save_strategy="steps" if state_dir else "no", save_steps=50, save_total_limit=1,
            eval_strategy="no", report_to="none", seed=cfg.seed,
            use_cpu=not on_gpu, dataloader_num_workers=0, disable_tqdm=True,
            gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator, callbacks=[Clock()])
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        train_seconds = earlier + clock["end"] - clock["start"]
        # accelerate's data loader fetches one batch ahead: count only the batches trained on.
        trained = collator.batches[:cfg.max_steps]
        step_seconds = [b - a for a, b in zip([clock["start"]] + clock.get("steps", [])[:-1], clock.get("steps", []))]
        collator.batches = []
        start = time.perf_counter()
        pred = trainer.predict(val)
        eval_seconds = time.perf_counter() - start
        evaluated = collator.batches
        # The arm's peak memory is its training and predict(): the comparison's inference copy is not the recipe's.
        peak = _peak_memory()
        same_model = (same_model_eval(trainer, model, val, data["validation"], tokenizer, spec, cfg,
                                      (eval_seconds, pred.predictions)) if compare_eval else None)
    # Score against pred.label_ids, not val["labels"]: with group_by_length the Trainer evaluates in
    # length-grouped (shuffled) order as well (transformers PR #33514), so predictions come back permuted.
    # Scoring them against the dataset's order gave 59.1 % for a run whose adapter scores 78.2 %.
    scores = _scores(spec, pred.predictions, pred.label_ids)
    # A resumed run saw only its last batches: its token counts (and throughputs) are not the run's.
    counted = not resume
    return {
        "compute_dtype": cfg.bnb_4bit_compute_dtype,
        "train_seconds": train_seconds, "train_steps": cfg.max_steps, "train_loss": result.training_loss,
        "train_examples": sum(b[0] for b in trained) if counted else None,
        "train_real_tokens": sum(b[1] for b in trained) if counted else None,
        "step_seconds": step_seconds if counted else [], "step_tokens": [b[1] for b in trained] if counted else [],
        "train_padding_efficiency": sum(b[1] for b in trained) / sum(b[2] for b in trained) if counted else None,
        "eval_seconds": eval_seconds, "eval_examples": len(val),
        "eval_padding_efficiency": sum(b[1] for b in evaluated) / sum(b[2] for b in evaluated),
        "eval_real_tokens": sum(val["length"]), **scores,
        "peak_memory_bytes": peak, **({"same_model_eval": same_model} if same_model is not None else {}),
    }


SAME_MODEL_ROUNDS = 2


def same_model_eval(trainer, model, trainer_val, val, tokenizer, spec, cfg, first: tuple) -> dict:
    """The evaluation target measured on ONE model: this arm's trained model, in this process, after its training.

    ``trainer.predict()`` against ft.py's evaluation (``qlora_cls.evaluation.predict(fast=True)``, what ft.py runs
    after every epoch) on the same model object, validation rows and batch size, in rotating order
    (Trainer, ft | ft, Trainer, ...; ``first`` is the arm's own predict() time and logits, round 1's Trainer
    figure). Each path's figure is its best round. Why not the ``ft`` arm against this arm: those are two
    models trained in two processes minutes apart, and on a shared VM one such measurement moves ~15 % from
    run to run (bench/results/20261203-114106.md and -123924.md: 1.92x and 1.69x for unchanged code).
    """
    import numpy as np
    from qlora_cls.data import TokenizedSplit
    from qlora_cls.evaluation import predict
    batcher = TokenizedSplit(val, tokenizer, spec.is_regression)
    seconds = {"trainer": [first[0]], "ft": []}
    logits = {"trainer": np.asarray(first[1], dtype=np.float32)}
    for r in range(SAME_MODEL_ROUNDS):
        for path in ("trainer", "ft") if r % 2 == 0 else ("ft", "trainer"):
            if r == 0 and path == "trainer":
                continue  # timed already: the arm's own predict()
            start = time.perf_counter()
            if path == "trainer":
                out = trainer.predict(trainer_val).predictions
            else:
                out, stats = predict(model, batcher, cfg.eval_batch_size, trainer.accelerator, fast=True)
            seconds[path].append(time.perf_counter() - start)
            logits[path] = np.asarray(out, dtype=np.float32)
    n = len(val)
    # Agreement per example: the same argmax; for a regression head, scores within 5e-2 (the two paths' bf16
    # logits differ by up to 1.3e-2 on MRPC: bench/results/20261203-140823.md).
    agree = logits["ft"].argmax(-1) == logits["trainer"].argmax(-1) if not spec.is_regression else \
        np.isclose(logits["ft"], logits["trainer"], atol=5e-2).all(-1)
    return {"examples": n, "rounds": SAME_MODEL_ROUNDS, "seconds": seconds,
            "trainer_examples_per_s": n / min(seconds["trainer"]), "ft_examples_per_s": n / min(seconds["ft"]),
            "argmax_agreement": float(agree.mean()),
            "max_abs_logit_diff": float(np.abs(logits["ft"] - logits["trainer"]).max()),
            "ft_fast_path": {k: v for k, v in stats.items() if k.startswith("eval_") and not isinstance(v, float)}}


# -- arm 3: ft.py --------------------------------------------------------------------------------------
def run_ft(args, extra: tuple[str, ...] = ()) -> dict:
    import ft
    from qlora_cls.batching import padding_efficiency
    cfg = train_config(args)
    _, _, _, data = tokenized_data(cfg)
    lengths = data["train"]["length"]
    plan = ft_plan(lengths, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--dataset", args.dataset, "--results_path", str(Path(tmp) / "run"), "--prompt", args.prompt,
                "--max_steps", str(args.steps), "--batch_size", str(args.batch_size),
                "--eval_batch_size", str(args.eval_batch_size), "--lr", str(args.lr),
                "--warmup_ratio", str(args.warmup_ratio), "--seed", str(args.seed),
                "--max_length", str(args.max_length),
                "--gradient_checkpointing", "true" if _checkpointing(args) else "false",
                "--log_every", "1", *extra]  # one log line per step: per-step throughput (see _derive)
        for flag in ("model_dir", "max_train_samples", "max_eval_samples"):
            if getattr(args, flag) is not None:
                argv += [f"--{flag}", str(getattr(args, flag))]
        summary = ft.main(argv)
        log = [json.loads(x) for x in (Path(tmp) / "run" / "train_log.jsonl").read_text().splitlines()]
    final = summary["final"]
    return {
        "compute_dtype": cfg.bnb_4bit_compute_dtype,  # what ft.py's auto picked (resolved by the same rule)
        "train_seconds": summary["train_seconds"], "train_steps": args.steps, "train_loss": log[-1]["loss"],
        "step_tokens": [sum(lengths[r] for r in b) for b in plan],
        "step_seconds": [sum(lengths[r] for r in b) / e["tokens_per_s"] for b, e in zip(plan, log)],
        "loss_curve": [e["loss"] for e in log],
        "train_examples": sum(len(b) for b in plan), "train_real_tokens": sum(lengths[r] for b in plan for r in b),
        "train_padding_efficiency": padding_efficiency(plan, lengths),
        "eval_seconds": final["eval_seconds"], "eval_examples": len(data["validation"]),
        "eval_padding_efficiency": final["eval_padding_efficiency"],
        "eval_real_tokens": sum(data["validation"]["length"]),
        **{k: final[k] for k in ("accuracy", "f1") if k in final},
    }


def train_step(forward, batch, trainable, optimizer, scheduler, max_grad_norm):
    """One plain optimizer step (no accumulation, no loop bookkeeping); returns the loss tensor."""
    import torch
    loss = forward(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


# -- arm 4: the dense limit -------------------------------------------------------------------------------
def dense_batch(rows, lengths, ids, labels, device) -> dict:
    """The rows as equal-length rows of their mean real length, each cut from (or cycled over) its own
    example's tokens: the same real token count with no padding and no attention mask to apply."""
    import torch
    width = max(1, round(sum(lengths[r] for r in rows) / len(rows)))
    x = torch.tensor([(ids[r] * math.ceil(width / lengths[r]))[:width] for r in rows], device=device)
    return {"input_ids": x, "attention_mask": torch.ones_like(x),
            "labels": torch.tensor([labels[r] for r in rows], device=device)}


def run_dense(args) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from qlora_cls.methods import add_trainable
    from qlora_cls.modeling import load_base_model

    cfg = train_config(args)
    model_path, tokenizer, spec, data = tokenized_data(cfg)
    lengths, ids, labels = data["train"]["length"], data["train"]["input_ids"], data["train"]["labels"]
    plan = ft_plan(lengths, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = add_trainable(load_base_model(cfg, model_path, spec.num_labels, tokenizer.pad_token_id,
                                     {"": str(device)}), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    import bitsandbytes as bnb
    optimizer = bnb.optim.AdamW8bit(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    batches = [dense_batch(rows, lengths, ids, labels, device) for rows in plan]
    model.train()
    start = time.perf_counter()
    step_seconds = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = train_step(model, batch, trainable, optimizer, scheduler, cfg.max_grad_norm)
        step_seconds.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"compute_dtype": cfg.bnb_4bit_compute_dtype,
            "train_seconds": seconds, "train_steps": len(batches), "train_loss": float(loss),
            "train_examples": sum(len(b["labels"]) for b in batches), "step_seconds": step_seconds,
            "step_tokens": [b["input_ids"].numel() for b in batches],
            "train_real_tokens": sum(b["input_ids"].numel() for b in batches), "train_padding_efficiency": 1.0}


# -- orchestration -----------------------------------------------------------------------------------------
def _machine() -> dict:
    import utils
    from qlora_cls.hardware import cpu_bf16_support, cpu_dtype_probe, cpu_model_name
    info = utils.hardware_info()
    info["cpu_model"] = cpu_model_name()
    info.update(cpu_bf16_support())  # avx512_bf16, amx_bf16, oneDNN
    probe = cpu_dtype_probe()  # what --bnb_4bit_compute_dtype auto measured here and picked
    info["compute_dtype_probe"] = {k: probe[k] for k in ("float32_gflops", "bfloat16_gflops", "choice")}
    import torch
    info["torch_threads"] = torch.get_num_threads()
    info["packages"] = utils.package_versions()
    return info


def _derive(r: dict) -> dict:
    out = dict(r)
    if r.get("train_seconds") and r.get("train_real_tokens") is not None:
        out["train_tokens_per_s"] = r["train_real_tokens"] / r["train_seconds"]
        out["train_examples_per_s"] = r["train_examples"] / r["train_seconds"]
        out["train_seconds_per_step"] = r["train_seconds"] / r["train_steps"]
    if r.get("step_seconds"):
        # The median of per-step throughputs: robust to steps slowed down by other processes on a shared machine.
        rates = sorted(t / s for t, s in zip(r["step_tokens"], r["step_seconds"]))
        out["train_tokens_per_s_median_step"] = rates[len(rates) // 2]
    if r.get("eval_seconds"):
        out["eval_examples_per_s"] = r["eval_examples"] / r["eval_seconds"]
        out["eval_tokens_per_s"] = r["eval_real_tokens"] / r["eval_seconds"]
    return out


def ratios(arms: dict) -> dict:
    out = {}
    ft = arms.get("ft", {})
    for other in (*TRAINER_ARMS, "dense", "ft_torch_dropout"):
        o = arms.get(other, {})
        if ft.get("train_tokens_per_s") and o.get("train_tokens_per_s"):
            out[f"train_tokens_per_s_ft_over_{other}"] = ft["train_tokens_per_s"] / o["train_tokens_per_s"]
            out[f"train_examples_per_s_ft_over_{other}"] = ft["train_examples_per_s"] / o["train_examples_per_s"]
        if ft.get("train_tokens_per_s_median_step") and o.get("train_tokens_per_s_median_step"):
            out[f"train_tokens_per_s_median_step_ft_over_{other}"] = (ft["train_tokens_per_s_median_step"]
                                                                      / o["train_tokens_per_s_median_step"])
        if ft.get("eval_examples_per_s") and o.get("eval_examples_per_s"):
            out[f"eval_examples_per_s_ft_over_{other}"] = ft["eval_examples_per_s"] / o["eval_examples_per_s"]
        if "accuracy" in ft and "accuracy" in o:
            out[f"accuracy_points_ft_minus_{other}"] = 100 * (ft["accuracy"] - o["accuracy"])
            out[f"f1_points_ft_minus_{other}"] = 100 * (ft["f1"] - o["f1"])
    same = arms.get(SAME_MODEL_ARM, {}).get("same_model_eval")
    if same:  # one model, one process: the evaluation target (see same_model_eval)
        out["eval_examples_per_s_ft_over_trainer_predict_same_model"] = (same["ft_examples_per_s"]
                                                                         / same["trainer_examples_per_s"])
        out["eval_argmax_agreement_ft_vs_trainer_predict_same_model"] = same["argmax_agreement"]
    if ft.get("loss_curve") and arms.get("ft_torch_dropout", {}).get("loss_curve"):
        a, b = (window_means(arms[k]["loss_curve"]) for k in ("ft", "ft_torch_dropout"))
        out["loss_window_max_abs_diff_ft_vs_ft_torch_dropout"] = max(abs(x - y) for x, y in zip(a, b))
    return out


def window_means(losses: list[float], window: int = LOSS_WINDOW) -> list[float]:
    """Mean training loss over consecutive windows of steps (a loss curve with the step-to-step noise averaged)."""
    return [sum(losses[i:i + window]) / len(losses[i:i + window]) for i in range(0, len(losses), window)]


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    arms = result["arms"]
    names = {"trainer_default_bf16": "Trainer + PEFT, bf16 (random batches)",
             "trainer_grouped_bf16": "Trainer + PEFT, bf16 (group_by_length)",
             "trainer_default": "Trainer + PEFT, float32 (random batches)",
             "trainer_grouped": "Trainer + PEFT, float32 (group_by_length)",
             "ft": "ft.py (defaults)", "dense": "dense limit (no padding, no loop)",
             "ft_torch_dropout": "ft.py, torch dropout (--fast_cpu_dropout false)"}

    def f(v, fmt="{:.1f}"):
        return "–" if v is None else fmt.format(v)

    lines = [f"Benchmark {result['started']}: {s['steps']} optimizer steps of batch {s['batch_size']}, "
             f"{m.get('cpu_model', m.get('cpu'))} ({m.get('cpu_count')} cores, {m.get('torch_threads')} torch threads"
             f"{', GPU ' + ', '.join(m['gpus']) if m.get('gpus') else ''}), torch {m['packages'].get('torch')}, "
             f"transformers {m['packages'].get('transformers')}, peft {m['packages'].get('peft')}, "
             f"bitsandbytes {m['packages'].get('bitsandbytes')}; model {s['model']}, data {s['dataset']} "
             f"({s['train_examples']} train / {s['eval_examples']} validation examples used).", "",
             "| arm | compute dtype | train real tokens/s | (median step) | train examples/s | s/step | train padding eff. | "
             "eval examples/s | eval real tokens/s | eval padding eff. | peak memory (MiB) | val. accuracy | val. F1 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in names.items():
        a = arms.get(name)
        if not a:
            continue
        if "error" in a:
            lines.append(f"| {label} | failed: {a['error'][:80]} |" + " |" * 11)
            continue
        lines.append(f"| {label} | {a.get('compute_dtype', '–')} | {f(a.get('train_tokens_per_s'))} | "
                     f"{f(a.get('train_tokens_per_s_median_step'))} | "
                     f"{f(a.get('train_examples_per_s'), '{:.2f}')} | "
                     f"{f(a.get('train_seconds_per_step'), '{:.2f}')} | {f(a.get('train_padding_efficiency'), '{:.3f}')} | "
                     f"{f(a.get('eval_examples_per_s'), '{:.2f}')} | {f(a.get('eval_tokens_per_s'))} | "
                     f"{f(a.get('eval_padding_efficiency'), '{:.3f}')} | {f(a.get('peak_memory_bytes', 0) / 2**20, '{:.0f}')} | "
                     f"{f(a.get('accuracy'), '{:.4f}')} | {f(a.get('f1'), '{:.4f}')} |")
    lines += ["", "| target | measured | required | met |", "| --- | ---: | ---: | :---: |"]
    for label, (key, minimum) in TARGETS.items():
        v = result["ratios"].get(key)
        lines.append(f"| {label} | {f(v, '{:.2f}')} | >= {minimum:g} | {'–' if v is None else 'yes' if v >= minimum else 'NO'} |")
    same = arms.get(SAME_MODEL_ARM, {}).get("same_model_eval")
    if same:
        secs = same["seconds"]
        lines += ["", f"Evaluation on one model ({names[SAME_MODEL_ARM]}'s trained model, in its process after its "
                  f"training; {same['examples']} validation examples, batch {s['eval_batch_size']}, rotating rounds): "
                  f"Trainer predict() {same['trainer_examples_per_s']:.2f} examples/s (rounds: "
                  + ", ".join(f"{same['examples'] / t:.2f}" for t in secs["trainer"])
                  + f"), ft.py's evaluation {same['ft_examples_per_s']:.2f} (rounds: "
                  + ", ".join(f"{same['examples'] / t:.2f}" for t in secs["ft"])
                  + f"); argmax agreement {same['argmax_agreement']:.4f}, max |logit diff| "
                  f"{same['max_abs_logit_diff']:.2e}. The arms' own eval columns above are one round each on two "
                  f"different models."]
    other = {k: v for k, v in result["ratios"].items() if k not in {key for key, _ in TARGETS.values()}}
    if other:
        lines += ["", "Other ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in sorted(other.items()))]
    curves = {k: window_means(arms[k]["loss_curve"]) for k in ("ft", "ft_torch_dropout") if arms.get(k, {}).get("loss_curve")}
    if len(curves) == 2:
        lines += ["", f"Training loss, mean per {LOSS_WINDOW} steps: "
                  + "; ".join(f"{names[k]}: " + ", ".join(f"{v:.3f}" for v in c) for k, c in curves.items())]
    return "\n".join(lines) + "\n"


def run_arm_subprocess(args, arm: str, argv: list[str], log_path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "arm.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--run_arm", arm, "--arm_out", str(out)]
        with open(log_path, "w") as logf:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO))
        if proc.returncode != 0 or not out.is_file():
            tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
            return {"error": f"exit {proc.returncode}: {tail[0]}"}
        return json.loads(out.read_text())


def run_arm(args, arm: str) -> dict:
    import logging
    logging.basicConfig(level=logging.WARNING)
    fns = {name: (lambda g=g, d=d, n=name: run_trainer(args, g, d, compare_eval=n == SAME_MODEL_ARM))
           for name, (g, d) in TRAINER_ARMS.items()}
    fns.update(ft=lambda: run_ft(args), dense=lambda: run_dense(args),
               ft_torch_dropout=lambda: run_ft(args, ("--fast_cpu_dropout", "false")))
    fn = fns[arm]
    load_before = os.getloadavg()[0]
    result = fn()
    result.setdefault("peak_memory_bytes", _peak_memory())
    # Other processes on the machine distort timings: the 1-minute load average before/after says how much.
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_arm:
        result = run_arm(args, args.run_arm)
        Path(args.arm_out).write_text(json.dumps(result))
        return result

    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = train_config(args)
    _, _, _, data = tokenized_data(cfg)
    result = {"started": datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
              "settings": {**{k: v for k, v in vars(args).items() if k not in ("run_arm", "arm_out", "out")},
                           "model": args.model_dir or "embedded SmolLM2-135M-Instruct",
                           "compute_dtype": {"ft and dense (auto)": cfg.bnb_4bit_compute_dtype,
                                             **{a: d for a, (_, d) in TRAINER_ARMS.items()}},
                           "gradient_checkpointing": _checkpointing(args), "optimizer": "bitsandbytes AdamW8bit",
                           "lora": {"r": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                                    "target_modules": list(cfg.target_modules)},
                           "train_examples": len(data["train"]), "eval_examples": len(data["validation"]),
                           "peak_memory": "cumulative over the arms (in-process run)" if args.in_process
                           else "peak RSS (CPU) / max allocated CUDA memory of each arm's own process"},
              "arms": {}}
    for arm in args.arms.split(","):
        print(f"[bench] {arm}: running {args.steps} steps ...", flush=True)
        t0 = time.perf_counter()
        r = run_arm(args, arm) if args.in_process else run_arm_subprocess(args, arm, argv, out_dir / f"{stamp}-{arm}.log")
        result["arms"][arm] = r if "error" in r else _derive(r)
        a = result["arms"][arm]
        print(f"[bench] {arm}: {time.perf_counter() - t0:.0f} s wall; "
              + (a["error"] if "error" in a else
                 f"{a['train_tokens_per_s']:.1f} train tokens/s" +
                 (f", {a['eval_examples_per_s']:.2f} eval examples/s, accuracy {a['accuracy']:.4f}"
                  if "eval_examples_per_s" in a else "")), flush=True)
    result["ratios"] = ratios(result["arms"])
    result["targets"] = {label: {"ratio": key, "min": minimum, "value": result["ratios"].get(key),
                                 "met": None if result["ratios"].get(key) is None else result["ratios"][key] >= minimum}
                         for label, (key, minimum) in TARGETS.items()}
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / f"{stamp}.md").write_text(md)
    print(md)
    print(f"[bench] wrote {json_path} and {json_path.with_suffix('.md')}")
    result["json_path"] = str(json_path)
    return result


if __name__ == "__main__":
    main()
