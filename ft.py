"""QLoRA fine-tuning of a causal LM with a classification head, launched with Accelerate.

    accelerate launch ft.py --model_dir meta-llama/Meta-Llama-3-8B --prompt perfect   # the reference run
    python ft.py                                      # the embedded SmolLM2-135M on MRPC, any machine

Reads top to bottom: check everything cheap, load data, build the 4-bit model with LoRA, train with
evaluation after each epoch, and leave a self-describing results folder (see README.md).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from qlora_cls.cli import parse_dataclass
from qlora_cls.config import TrainConfig
from qlora_cls.errors import UsageError
from qlora_cls.files import append_jsonl, atomic_write_csv, atomic_write_json, atomic_write_text

log = logging.getLogger("ft")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Entry point; returns the final metrics (on every process) so tests can call it directly."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        cfg = parse_dataclass(TrainConfig, argv, "ft.py", __doc__)
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return train(cfg)
        finally:  # callers (tests, sweeps) get their own signal handling back
            for sig, handler in handlers.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)
    except UsageError as exc:
        sys.stderr.write(f"ft.py: error: {exc}\n")
        raise SystemExit(2)
    except FloatingPointError as exc:
        sys.stderr.write(f"ft.py: error: {exc}\n")
        raise SystemExit(1)
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        # A full disk or a read-only folder: atomic writes left no truncated file behind (files.py).
        sys.stderr.write(f"ft.py: error: cannot write {exc.filename or 'the results folder'}: {exc.strerror}; "
                         f"free space or choose a writable --results_path, then rerun with --resume\n")
        raise SystemExit(1)


def train(cfg: TrainConfig) -> Optional[dict]:
    """Setup, the training loop, the final outputs. The loop is here in full; the phases around it follow.

    The objective's three pieces, each one line to swap: the collator (``build_training``'s DataLoader), the
    loss (``forward(model, batch).loss``) and the evaluator (``evaluate``)."""
    from tqdm.auto import tqdm

    from qlora_cls import checkpoint

    run = setup(cfg)  # everything cheap is checked first: a bad flag must not cost a model load
    if not isinstance(run, Run):
        return run  # --dry_run: the memory estimate
    model, optimizer, scheduler, loader, trainable = build_training(run)
    write_run_records(run, model)
    progress = resume_or_start(run, model, optimizer, scheduler)
    accelerator, run_dir = run.accelerator, run.dir
    if run.generative:  # the base model's scores (the model at step 0), beside which the run is judged
        score_base_model(run, model, progress)
    stop = _StopFlag(accelerator)

    bar = tqdm(total=run.total_steps, initial=progress["global_step"], disable=not accelerator.is_main_process,
               desc="training")
    global_step = progress["global_step"]
    window = _Window(accelerator.device)
    forward = run.prefix.forward(accelerator.autocast)  # model(**batch), or with the shared prefix run once
    start_epoch = progress["epoch"]
    for epoch in range(start_epoch, run.epochs):
        model.train()
        # The batch order is a function of (seed, epoch). Accelerate passes its loader's epoch on to the sampler
        # in one process; under several its BatchSamplerShard does not, so the sampler is told directly too.
        loader.set_epoch(epoch)
        run.sampler.set_epoch(epoch)
        first = progress["batch_in_epoch"] if epoch == start_epoch else 0  # resumed mid-epoch: skip what was trained
        clock = time.perf_counter()  # training time only: evaluations and checkpoints are not counted
        for i, batch in enumerate(accelerator.skip_first_batches(loader, first) if first else loader, first):
            with accelerator.accumulate(model):
                loss = forward(model, batch).loss
                accelerator.backward(loss)
                window.add(loss.detach(), batch["attention_mask"].sum(), len(batch["input_ids"]))
                if accelerator.sync_gradients:
                    optimizer_step(run, trainable, optimizer, scheduler, window, progress, global_step + 1, epoch)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            bar.update(1)
            progress.update(epoch=epoch, batch_in_epoch=i + 1, global_step=global_step)
            if global_step % cfg.log_every == 0 or global_step == run.total_steps:
                entry = window.flush(accelerator, global_step, epoch, scheduler.get_last_lr()[0])
                if accelerator.is_main_process:
                    append_jsonl(run_dir / "train_log.jsonl", entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
                accelerator.log({f"train/{k}": v for k, v in entry.items() if k not in ("step", "epoch")}
                                | run.train_baseline_scalars, step=global_step)
            # Step-wise evaluation (--eval_every); the epoch's last step is evaluated just below, once.
            ends_epoch = i + 1 == len(loader) or global_step >= run.total_steps
            if cfg.eval_every and global_step % cfg.eval_every == 0 and not ends_epoch:
                progress["train_seconds"] += time.perf_counter() - clock
                evaluate(run, model, progress, epoch, "step")
                model.train()
                clock = time.perf_counter()
            if stop.requested() or (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0):
                progress["train_seconds"] += time.perf_counter() - clock
                checkpoint.save(accelerator, run_dir, model, optimizer, scheduler, progress, cfg.keep_checkpoints)
                clock = time.perf_counter()
                if stop.signum:
                    log.info("stopped by signal %d at step %d; continue with --resume", stop.signum, global_step)
                    accelerator.end_training()
                    raise SystemExit(128 + stop.signum)
            if global_step >= run.total_steps:
                break
        progress["train_seconds"] += time.perf_counter() - clock

        # Evaluation after each epoch (and after the last step when --max_steps ends mid-epoch).
        logits = evaluate(run, model, progress, epoch, "epoch")
        progress.update(epoch=epoch + 1, batch_in_epoch=0)
        if global_step >= run.total_steps:
            break  # the final state is saved as adapter/ by finish()
        checkpoint.save(accelerator, run_dir, model, optimizer, scheduler, progress, cfg.keep_checkpoints)
    bar.close()
    return finish(run, model, progress, logits)


# -- the phases around the loop ---------------------------------------------------------------------
@dataclass
class Run:
    """What the phases of one run share: built by setup(), read by the loop and the phases around it."""
    cfg: TrainConfig
    accelerator: Any
    dir: Path  # the results folder
    data: Any  # pipeline.PreparedData: task, tokenized splits, the bound template
    train_rows: Any  # every training split as one tokenized set
    eval_split: str
    extra_splits: list  # scored with the final weights only (MNLI mismatched)
    model_path: str
    tokenizer: Any
    plan: Any  # modeling.ModelPlan: the head and the LoRA targets, resolved for this architecture
    param_budget: Optional[dict]  # what --param_budget chose (methods.resolve_param_budget)
    zero3: bool
    select_best: bool  # False under the final protocol (the validation split is trained on)
    resuming: bool
    baseline: dict  # the trivial baseline scored on the eval examples
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    prefix: Any  # prefix.TrainingPrefix: the prompt tokens each batch runs once (0 = none), and why; for label
    # words label_words.AnswerTokensForward (no prefix; logits only where a label token is predicted)
    sampler: Any  # batching.LengthGroupedBatchSampler: every process's training batches, per epoch
    counts: dict = field(default_factory=dict)  # trainable and total parameters
    records: dict = field(default_factory=dict)  # config.json's content
    quant: dict = field(default_factory=dict)  # quant_config.json's content

    @property
    def generative(self) -> bool:
        return self.cfg.objective != "classification"

    @property
    def spec(self):
        return self.data.task.spec

    @property
    def eval_rows(self):
        return self.data.eval if self.generative else self.data.batchers[self.eval_split]

    @property
    def metric_names(self) -> list:
        from qlora_cls.generative import METRICS
        return list(METRICS[self.cfg.objective]) if self.generative else list(self.spec.metrics)

    @property
    def main_metric(self) -> str:
        from qlora_cls.generative import MAIN_METRIC
        return MAIN_METRIC[self.cfg.objective] if self.generative else self.spec.main_metric

    @property
    def train_baseline_scalars(self) -> dict:
        return {"train/baseline_loss": self.baseline["train_loss"]} if "train_loss" in self.baseline else {}

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def baseline_scalars(self) -> dict:
        return {f"eval/baseline_{k}": v for k, v in self.baseline["metrics"].items() if v is not None}


def setup(cfg: TrainConfig):
    """Checks, data, the model's plan (meta device) and the run folder: everything before any weight is read.

    Returns the Run, or under --dry_run the memory estimate.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed

    from qlora_cls import checkpoint
    from qlora_cls import records as rec
    from qlora_cls.data import DataSource, check_trainable, concat_batchers
    from qlora_cls.label_words import AnswerTokensForward, LabelWords, LabelWordSplit
    from qlora_cls.memory import resolve_gradient_checkpointing
    from qlora_cls import methods
    from qlora_cls.modeling import meta_model
    from qlora_cls.pipeline import check_model_paths, prepare_data, tokenizer_for
    from qlora_cls.preflight import check_launch_and_resolve
    from qlora_cls.prefix import is_causal_decoder, training_prefix
    from qlora_cls.prompts import load_template
    from qlora_cls.tasks import GLUE_TASKS

    generative = cfg.objective != "classification"  # sft / lm: qlora_cls/generative.py
    template = None if generative else load_template(cfg.prompt, cfg.glue_task)
    check_model_paths(cfg.model_dir, cfg.tokenizer_dir)
    source = None if generative else DataSource.from_config(cfg)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with="tensorboard",
                              # The run folder is named later (it needs the processes to agree on a time
                              # stamp); the tracker is pointed at it before init_trackers.
                              project_config=ProjectConfiguration(project_dir=str(RESULTS_DIR)))
    # auto may measure the CPU (qlora_cls/hardware.py): the main process measures and caches, the others
    # read its cache, and every process takes the main process's answer.
    with accelerator.main_process_first():
        cfg.resolve_auto(accelerator.device.type)
    if accelerator.num_processes > 1:
        cfg.bnb_4bit_compute_dtype = broadcast_object_list([cfg.bnb_4bit_compute_dtype])[0]
    zero3 = check_launch_and_resolve(cfg, accelerator)
    eval_split = cfg.eval_split or _default_eval_split(cfg)
    if eval_split in cfg.train_splits:
        raise UsageError(f"cannot select epochs on {eval_split!r}: it is also trained on (--train_splits "
                         f"{' '.join(cfg.train_splits)}); evaluate on a held-out split with --eval_split")
    if cfg.dry_run:  # memory estimate from shapes on the meta device: no weights are read
        from qlora_cls.memory import dry_run
        return dry_run(cfg, source, template, cfg.train_splits, eval_split, accelerator)
    model_path, tokenizer = tokenizer_for(cfg)
    if generative:
        return _setup_generative(cfg, accelerator, zero3, model_path, tokenizer)
    # MNLI is also scored on its mismatched genres at the end (not when the validation splits are trained on).
    extra_splits = [] if cfg.trains_on_eval_data or cfg.train_file else [
        s for s in GLUE_TASKS[cfg.task].extra_eval_splits if s not in cfg.train_splits + [eval_split]]
    splits = list(dict.fromkeys(cfg.train_splits + [eval_split] + extra_splits))
    data = prepare_data(source, template, tokenizer, splits, cfg.max_length,
                        {s: cfg.max_train_samples for s in cfg.train_splits}
                        | {s: cfg.max_eval_samples for s in [eval_split] + extra_splits}, accelerator,
                        label_words=LabelWords.of(cfg))
    if cfg.causal_lm and not cfg.label_words and template.label_words:
        # the prompt file's '# label_words:' line: recorded as --label_words, which eval.py, predict.py and merge.py read
        cfg.label_words = list(data.words)
    spec = data.task.spec
    for s in cfg.train_splits:
        check_trainable(data.task.splits[s], s, cfg.label_column)
    # Head and LoRA targets resolved from the architecture (meta device, no weights read): a bad
    # --target_modules fails here, and config.json records what the presets meant for this model.
    # --classifier label_words: no head, the causal LM itself (num_labels None, as the generative objectives).
    head_labels = None if cfg.causal_lm else spec.num_labels
    meta = meta_model(model_path, head_labels, cfg.trust_remote_code)
    if cfg.causal_lm and not is_causal_decoder(meta.config):
        raise UsageError(f"--classifier label_words scores words with a causal LM; {meta.config.model_type} is not "
                         f"a causal decoder: use --classifier head")
    plan = methods.plan(cfg, meta)
    budget = methods.resolve_param_budget(cfg, model_path, head_labels)  # sets --r / --adapter_bottleneck
    resolve_gradient_checkpointing(cfg, model_path, head_labels,  # auto: from the estimate on a GPU, off on CPU
                                   max(max(data.batchers[s].lengths) for s in cfg.train_splits), accelerator)
    splits_trained = [data.batchers[s] for s in cfg.train_splits]
    train_rows = LabelWordSplit.concat(splits_trained) if cfg.causal_lm else concat_batchers(splits_trained)
    # The prompt's leading tokens, the same in every training example, run once per batch where that is
    # exact (qlora_cls/prefix.py); decided here so --share_prefix true fails before any weight is read.
    launch = None if accelerator.distributed_type == DistributedType.NO else str(accelerator.distributed_type)
    if cfg.causal_lm:  # exact for a pooled head; the label-word loss is on the last tokens, not built for it
        if cfg.share_prefix is True:
            raise UsageError("--share_prefix true: the shared prompt prefix is built for a classification head; "
                             "with --classifier label_words use --share_prefix auto or false")
        prefix = AnswerTokensForward("off (--classifier label_words)")  # logits only where a label is predicted
    else:
        prefix = training_prefix(cfg, meta.config, train_rows.input_ids, launch)
    log.info("shared prompt prefix in training: %s", prefix.reason)

    # Final protocol: with the validation split trained on, the only held-out split is the test set, and
    # picking an epoch on it would tune on test data: adapter/ is the last epoch and nothing is selected.
    select_best = not cfg.trains_on_eval_data
    if not select_best:
        log.info("no best-epoch selection: --train_splits %s leaves no held-out validation split (choosing an "
                 "epoch on %s would select on test data); adapter/ holds the last epoch",
                 " ".join(cfg.train_splits), eval_split)
    run_dir = _results_dir(cfg, data.template.name, accelerator, broadcast_object_list)
    if cfg.resume:
        checkpoint.check_resumable(run_dir, asdict(cfg), plan.target_modules)
    set_seed(cfg.seed)

    eval_rows = data.batchers[eval_split]
    # The trivial baseline: the training labels' majority class (or mean), scored on the eval examples.
    baseline = rec.score_baseline(spec, rec.baseline_rule(spec, train_rows.labels.numpy(), data.task.label_names),
                                  eval_rows.labels.numpy())
    log.info("trivial baseline on the %d %s examples: %s", baseline["eval_examples"], eval_split,
             rec.baseline_line(baseline))
    sampler, steps_per_epoch, total_steps = _schedule(cfg, accelerator, train_rows)
    return Run(cfg=cfg, accelerator=accelerator, dir=run_dir, data=data, train_rows=train_rows, eval_split=eval_split,
               extra_splits=extra_splits, model_path=model_path, tokenizer=tokenizer, plan=plan,
               param_budget=budget, zero3=zero3, select_best=select_best,
               resuming=cfg.resume and bool(checkpoint.checkpoints(run_dir)), baseline=baseline,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               warmup_steps=math.ceil(cfg.warmup_ratio * total_steps), prefix=prefix, sampler=sampler)


def _setup_generative(cfg: TrainConfig, accelerator, zero3: bool, model_path: str, tokenizer) -> Run:
    """setup() for --objective sft | lm: its data (qlora_cls/generative.py), the causal LM's plan (no head),
    the run folder. No shared prompt prefix: it is exact for a pooled head, not for a loss on every answer token."""
    from accelerate.utils import broadcast_object_list, set_seed

    from qlora_cls import checkpoint, generative, methods
    from qlora_cls.memory import resolve_gradient_checkpointing
    from qlora_cls.modeling import meta_model
    from qlora_cls.prefix import TrainingPrefix

    data = generative.prepare(cfg, tokenizer)
    if data.fmt and data.fmt.added_tokens and cfg.method not in ("qlora", "lora", "dora"):
        raise UsageError(f"--chat_template {cfg.chat_template} adds tokens ({', '.join(data.fmt.added_tokens)}) whose "
                         f"embeddings must train: use --method qlora, lora or dora, or a template of known tokens")
    meta = meta_model(model_path, None, cfg.trust_remote_code)
    plan = methods.plan(cfg, meta)
    budget = methods.resolve_param_budget(cfg, model_path, None)
    resolve_gradient_checkpointing(cfg, model_path, None, max(data.train.lengths), accelerator)
    name = cfg.objective if cfg.objective == "lm" else data.fmt.name
    run_dir = _results_dir(cfg, name, accelerator, broadcast_object_list)
    if cfg.resume:
        checkpoint.check_resumable(run_dir, asdict(cfg), plan.target_modules)
    set_seed(cfg.seed)
    sampler, steps_per_epoch, total_steps = _schedule(cfg, accelerator, data.train)
    return Run(cfg=cfg, accelerator=accelerator, dir=run_dir, data=data, train_rows=data.train,
               eval_split="validation", extra_splits=[], model_path=model_path, tokenizer=tokenizer, plan=plan,
               param_budget=budget, zero3=zero3, select_best=True,
               resuming=cfg.resume and bool(checkpoint.checkpoints(run_dir)), baseline={"metrics": {}},
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
               prefix=TrainingPrefix(0, f"off (--objective {cfg.objective})"), sampler=sampler)


def _schedule(cfg: TrainConfig, accelerator, train_rows):
    """The training batches (every process's, per epoch), optimizer steps per epoch and in all."""
    from qlora_cls.batching import DatasetTooSmall, LengthGroupedBatchSampler
    try:
        sampler = LengthGroupedBatchSampler(train_rows.lengths, cfg.batch_size, cfg.seed,
                                            accelerator.num_processes * cfg.gradient_accumulation_steps,
                                            cfg.group_by_length)
    except DatasetTooSmall as exc:
        raise UsageError(f"training data too small: {exc}")
    steps_per_epoch = len(sampler) // (accelerator.num_processes * cfg.gradient_accumulation_steps)
    return sampler, steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch  # --max_steps overrides --epochs


def build_training(run: Run):
    """Base (4-bit or not) + head + what --method trains, on this process's device; optimizer, schedule and
    the training DataLoader, prepared in one call."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from qlora_cls.modeling import parameter_counts
    from qlora_cls.pipeline import build_model

    cfg, accelerator = run.cfg, run.accelerator
    fmt = getattr(run.data, "fmt", None)
    model = build_model(cfg, run.model_path, run.tokenizer, None if cfg.causal_lm else run.spec.num_labels,
                        accelerator, zero3=run.zero3, head=run.plan.head,
                        new_tokens=fmt.added_tokens if fmt else ())
    run.counts = counts = parameter_counts(model)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{counts['trainable']:,}", f"{counts['total']:,}",
             100 * counts["trainable"] / counts["total"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable)
    # The scheduler is stepped by hand once per optimizer step: accelerate's prepared scheduler would
    # step it once per process, which makes warm-up and decay depend on the process count.
    scheduler = get_linear_schedule_with_warmup(optimizer, run.warmup_steps, run.total_steps)
    # A generator of its own: each pass of a DataLoader draws a base seed, which from the global generator would
    # shift the dropout masks (evaluations, which run DataLoaders too, would then change the training).
    loader = DataLoader(run.train_rows, batch_sampler=run.sampler, collate_fn=run.train_rows.collate,
                        generator=torch.Generator())
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return model, optimizer, scheduler, loader, trainable
def write_run_records(run: Run, model) -> None:
    """The run folder's settings (config.json first, so a crashed run still says what it was) and TensorBoard."""
    import utils
    from qlora_cls import methods
    from qlora_cls import records as rec
    from qlora_cls.batching import padding_efficiency
    from qlora_cls.modeling import quantization_config

    cfg, accelerator = run.cfg, run.accelerator
    world, accum = accelerator.num_processes, cfg.gradient_accumulation_steps
    if run.generative:
        fmt = run.data.fmt
        objective = {"task": cfg.objective, "label_names": None, "prompt_name": fmt.name if fmt else None,
                     "end_of_turn": fmt.end_of_turn if fmt else None, "added_tokens": fmt.added_tokens if fmt else [],
                     "stop_ids": run.data.stop_ids}
        prompt = fmt.template if fmt else None
    else:
        spec = run.spec
        objective = {"prompt_name": run.data.template.name, "task": spec.name, "num_labels": spec.num_labels,
                     "label_names": run.data.task.label_names, "text_columns": list(spec.text_columns),
                     "pad_token_in_inputs": run.data.pad_in_inputs, "classifier": cfg.classifier}
        if cfg.classifier == "label_words":  # the words as scored, and their tokens after the first eval prompt
            objective.update(label_words=run.data.words, length_normalize=cfg.length_normalize,
                             label_word_tokens=[run.tokenizer.convert_ids_to_tokens(c)
                                                for c in run.eval_rows.candidates[0]] if len(run.eval_rows) else None)
        prompt = run.data.template.text
    resolved = {"model_path": run.model_path, "eval_split": run.eval_split, **objective,
                "metrics": run.metric_names, "main_metric": run.main_metric, "pad_token_id": run.tokenizer.pad_token_id,
                **run.plan.to_dict(), "not_quantized": list(run.plan.head) if cfg.load_in_4bit else None,
                "parameters": run.counts,
                "train_examples": len(run.train_rows), "eval_examples": len(run.eval_rows),
                "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
                "warmup_steps": run.warmup_steps, "global_batch_size": cfg.batch_size * world * accum,
                "mixed_precision": accelerator.mixed_precision, "distributed_type": str(accelerator.distributed_type),
                "baseline": run.baseline, "param_budget": run.param_budget,
                "train_padding_efficiency": padding_efficiency(run.sampler.batches(0), run.train_rows.lengths),
                "train_prefix_tokens": run.prefix.tokens, "train_prefix": run.prefix.reason}
    quant = quantization_config(cfg, run.plan.head)
    run.quant = quant.to_dict() if quant else {"load_in_4bit": False}
    run.records = {
        "run": rec.describe_run(cfg, resolved, run.quant),  # what was run, at the top
        "config": asdict(cfg), "resolved": resolved,
        "environment": {"world_size": world, "packages": utils.package_versions(), "git_commit": utils.git_commit(),
                        "hardware": utils.hardware_info(), "started": datetime.now().isoformat(timespec="seconds")},
    }
    if accelerator.is_main_process and not run.resuming:
        atomic_write_json(run.dir / "config.json", run.records)
        atomic_write_json(run.dir / "quant_config.json", run.quant)
        name, settings = methods.config_record(run.cfg, accelerator.unwrap_model(model))  # lora_config.json, ...
        atomic_write_json(run.dir / name, settings)
        if prompt:
            atomic_write_text(run.dir / ("chat_template.jinja" if run.generative else "prompt.txt"), prompt + "\n")
    # accelerate's tracker writes to <logging_dir>/<project name>: the events land in the run folder itself,
    # so `tensorboard --logdir results` (or a sweep folder) names the run after its folder.
    accelerator.project_configuration.project_dir = str(run.dir)
    accelerator.project_configuration.logging_dir = str(run.dir.parent)
    accelerator.init_trackers(run.dir.name)
    if accelerator.is_main_process:
        rec.tensorboard_layout(accelerator.get_tracker("tensorboard", unwrap=True), run.metric_names,
                               run.baseline_scalars)
    accelerator.log({**run.baseline_scalars, **run.train_baseline_scalars}, step=0)


def resume_or_start(run: Run, model, optimizer, scheduler) -> dict:
    """The loop's position and what it has recorded so far: fresh, or from the run's last checkpoint."""
    from qlora_cls import checkpoint
    progress = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "history": [], "best": None,
                "train_seconds": 0.0, "skipped_steps": 0}
    if run.resuming:
        last = checkpoint.checkpoints(run.dir)[-1]
        progress = checkpoint.load(run.accelerator, last, model, optimizer, scheduler)
        log.info("resumed from %s (step %d)", last.name, progress["global_step"])
    if run.accelerator.is_main_process and run.cfg.resume:
        # Steps logged after the checkpoint are trained again: drop their lines so each step appears once.
        checkpoint.truncate_log(run.dir / "train_log.jsonl", progress["global_step"])
    return progress


def evaluate(run: Run, model, progress: dict, epoch: int, trigger: str):
    """Score the eval split, record and log it, keep the best weights so far in adapter_best/; the logits.

    ``trigger``: "epoch" (after each epoch, or the last step) or "step" (--eval_every). The best is chosen
    over every evaluation, whichever cadence produced it.
    """
    from accelerate.utils import broadcast_object_list
    from qlora_cls.evaluation import predict
    from qlora_cls.metrics import compute_metrics

    accelerator, step = run.accelerator, progress["global_step"]
    if run.generative:
        from qlora_cls import generative
        logits, stats = None, {}
        scores = generative.evaluate(run.cfg, accelerator.unwrap_model(model), run.data, run.tokenizer, accelerator,
                                     run.dir, run.eval_split, run.zero3)
    else:
        logits, stats = predict(accelerator.unwrap_model(model), run.eval_rows, run.cfg.eval_batch_size, accelerator,
                                fast=run.cfg.fast_eval)
        scores = compute_metrics(run.spec, logits, run.eval_rows.labels.numpy()) if accelerator.is_main_process else {}
        scores = broadcast_object_list([scores])[0]
    entry = {"epoch": epoch, "step": step, "split": run.eval_split, "trigger": trigger, **scores, **stats}
    progress["history"].append(entry)
    accelerator.log({f"eval/{k}": v for k, v in entry.items() if k not in ("epoch", "step", "split", "trigger")}
                    | run.baseline_scalars, step=step)
    when = f"epoch {epoch} (step {step})" if trigger == "epoch" else f"step {step} (epoch {epoch})"
    if scores:
        log.info("%s: %s (%s)", when, ", ".join(f"{k}={scores[k]:.4f}" for k in run.metric_names if k in scores),
                 _baseline_text(run))
    elif accelerator.is_main_process:
        log.info("%s: %s has hidden labels: predictions written, no score", when, run.eval_split)
    best = progress["best"]
    score = scores.get(run.main_metric)
    if run.generative and score is not None:
        score = -score  # perplexity: lower is better
    if run.select_best and scores and (best is None or score > best["score"]):
        progress["best"] = {"epoch": epoch, "step": step, "score": score}
        save_trained(run.accelerator, model, run.dir / "adapter_best", run.zero3, run.cfg)
    return logits


def _baseline_text(run: Run) -> str:
    from qlora_cls import records as rec
    if not run.generative:
        return f"trivial baseline: {rec.baseline_line(run.baseline)}"
    return "the base model: " + ", ".join(f"{k}={v:.4f}" for k, v in run.baseline["metrics"].items()
                                          if k in run.metric_names)


def score_base_model(run: Run, model, progress: dict) -> None:
    """The generative runs' baseline: the model before its first step is the base model (generative.py), scored
    once, kept in the checkpoints' progress (a resumed run does not score it again) and in TensorBoard."""
    from qlora_cls import generative
    scored_now = progress.get("base") is None
    if scored_now:
        progress["base"] = generative.evaluate(run.cfg, run.accelerator.unwrap_model(model), run.data, run.tokenizer,
                                               run.accelerator, run.dir, f"{run.eval_split}_base", run.zero3)
    run.baseline = {"kind": "base_model", "metrics": progress["base"]}
    if scored_now:
        log.info("before training, %s", _baseline_text(run))
        run.accelerator.log(run.baseline_scalars, step=0)


def finish(run: Run, model, progress: dict, logits) -> dict:
    """adapter/ (the final weights), the other eval splits, metrics.json, predictions, model cards, HParams."""
    import shutil

    from accelerate.utils import gather_object

    import utils
    from qlora_cls import records as rec
    from qlora_cls.batching import tokens_trained
    from qlora_cls.evaluation import predict, prediction_table
    from qlora_cls.latency import measure_latency
    from qlora_cls.metrics import compute_metrics

    if run.generative:
        return _finish_generative(run, model, progress)
    cfg, accelerator, spec, run_dir = run.cfg, run.accelerator, run.spec, run.dir
    label_names, eval_rows = run.data.task.label_names, run.eval_rows
    save_trained(accelerator, model, run_dir / "adapter", run.zero3, cfg)
    # The final weights on the task's other evaluation splits (MNLI mismatched), reported beside the main one.
    extra = {}
    for split in run.extra_splits:
        rows = run.data.batchers[split]
        extra_logits, extra_stats = predict(accelerator.unwrap_model(model), rows, cfg.eval_batch_size, accelerator,
                                            fast=cfg.fast_eval)
        if accelerator.is_main_process:
            extra[split] = {**compute_metrics(spec, extra_logits, rows.labels.numpy()), **extra_stats}
            atomic_write_csv(run_dir / f"predictions_{split}.csv", *prediction_table(spec, label_names, rows, extra_logits))
            log.info("final weights on %s: %s", split, ", ".join(f"{k}={extra[split][k]:.4f}" for k in spec.metrics))
    latency = measure_latency(accelerator.unwrap_model(model), eval_rows, accelerator, calls=cfg.latency_calls,
                              collective=run.zero3)
    history, best, step = progress["history"], progress["best"], progress["global_step"]
    final = history[-1]
    scores = {k: final[k] for k in spec.metrics if k in final}
    vs_baseline = rec.compare(spec, scores, run.baseline, rec.model_mse(logits, eval_rows.labels.numpy())
                              if spec.is_regression else None)
    epochs_trained = step / run.steps_per_epoch
    tokens = tokens_trained(run.sampler, accelerator.num_processes, cfg.gradient_accumulation_steps, step)
    seconds = progress["train_seconds"]
    summary = {
        "run": rec.describe_run(cfg, run.records["resolved"], run.quant, step, len(history)),
        "task": spec.name, "main_metric": spec.main_metric, "eval_split": run.eval_split,
        "baseline": run.baseline, "vs_baseline": vs_baseline,
        # Every evaluation in order; `epochs` keeps the end-of-epoch ones (runs saved before --eval_every have no trigger).
        "evaluations": history, "epochs": [e for e in history if e.get("trigger", "epoch") == "epoch"],
        "best_epoch": best["epoch"] if best else None, "best_step": best["step"] if best else None,
        "final": dict(final), "other_splits": extra,
        "parameters": run.counts, "train_seconds": seconds, "skipped_steps": progress["skipped_steps"],
        "epochs_trained": epochs_trained, "train_seconds_per_epoch": seconds / epochs_trained if epochs_trained else None,
        "train_tokens": tokens, "train_tokens_per_s": tokens / seconds if seconds else None,
        "train_padding_efficiency": run.records["resolved"].get("train_padding_efficiency"),
        "peak_memory_bytes": max(gather_object([utils.peak_memory_bytes(accelerator.device)])),
        "latency": latency, "world_size": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        if best and best["step"] == final["step"]:
            shutil.rmtree(run_dir / "adapter_best", ignore_errors=True)  # identical to adapter/
        summary["has_adapter_best"] = (run_dir / "adapter_best").is_dir()
        summary["adapter_bytes"] = sum(p.stat().st_size for p in (run_dir / "adapter").rglob("*")
                                       if p.is_file() and p.name != "README.md")
        header, rows = prediction_table(spec, label_names, eval_rows, logits)
        atomic_write_csv(run_dir / f"predictions_{run.eval_split}.csv", header, rows)
        rec.write_model_cards(run_dir, run.records, run.quant, run.data.template.text, summary, run.baseline)
        warning = rec.warning_text(vs_baseline, run.baseline, run.eval_split, "the final adapter")
        if warning:
            log.warning(warning)
        atomic_write_json(run_dir / "metrics.json", summary)  # last: its presence means the run finished
        swept = rec.swept_fields(run_dir)
        rec.write_hparams(accelerator.get_tracker("tensorboard", unwrap=True),
                          rec.hparams(cfg, run.records["resolved"], run.quant, swept),
                          {f"hparam/{k}": v for k, v in scores.items()}
                          | {f"hparam/baseline_{k}": v for k, v in run.baseline["metrics"].items() if v is not None},
                          swept)
        print(f"results: {run_dir}\ntensorboard: {rec.tensorboard_hint(run_dir, RESULTS_DIR)}")
    accelerator.end_training()
    return summary


def _finish_generative(run: Run, model, progress: dict) -> dict:
    """finish() for --objective sft | lm: adapter/ with the tokenizer (its chat template and any added tokens),
    metrics.json with the final scores beside the base model's, HParams."""
    import shutil

    from accelerate.utils import gather_object

    import utils
    from qlora_cls import records as rec
    from qlora_cls.batching import tokens_trained
    from qlora_cls.modelcard import write_generative_card

    cfg, accelerator, run_dir = run.cfg, run.accelerator, run.dir
    save_trained(accelerator, model, run_dir / "adapter", run.zero3, cfg)
    history, best, step = progress["history"], progress["best"], progress["global_step"]
    final, base = history[-1], run.baseline["metrics"]
    scores = {k: final[k] for k in run.metric_names if k in final}
    vs_base = {k: {"model": scores[k], "base_model": base[k], "change": scores[k] - base[k]}
               for k in scores if base.get(k) is not None}
    tokens = tokens_trained(run.sampler, accelerator.num_processes, cfg.gradient_accumulation_steps, step)
    seconds = progress["train_seconds"]
    summary = {
        "run": rec.describe_run(cfg, run.records["resolved"], run.quant, step, len(history)),
        "objective": cfg.objective, "main_metric": run.main_metric, "eval_split": run.eval_split,
        "baseline": run.baseline, "vs_baseline": vs_base, "evaluations": history, "final": dict(final),
        "best_step": best["step"] if best else None, "parameters": run.counts, "train_seconds": seconds,
        "skipped_steps": progress["skipped_steps"], "train_tokens": tokens,
        "train_tokens_per_s": tokens / seconds if seconds else None,
        "peak_memory_bytes": max(gather_object([utils.peak_memory_bytes(accelerator.device)])),
        "world_size": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        run.tokenizer.save_pretrained(run_dir / "adapter")  # generation needs the same template and vocabulary
        if best and best["step"] == final["step"]:
            shutil.rmtree(run_dir / "adapter_best", ignore_errors=True)  # identical to adapter/
        summary["has_adapter_best"] = (run_dir / "adapter_best").is_dir()
        for which in ("adapter", "adapter_best") if summary["has_adapter_best"] else ("adapter",):
            write_generative_card(run_dir / which, run.records, run.quant, summary, which)
        main = vs_base.get(run.main_metric)
        if main and main["change"] >= 0:
            log.warning("the final adapter does not improve on the base model: %s %.4f against %.4f (lower is "
                        "better)", run.main_metric, main["model"], main["base_model"])
        atomic_write_json(run_dir / "metrics.json", summary)  # last: its presence means the run finished
        swept = rec.swept_fields(run_dir)
        rec.write_hparams(accelerator.get_tracker("tensorboard", unwrap=True),
                          rec.hparams(cfg, run.records["resolved"], run.quant, swept),
                          {f"hparam/{k}": v for k, v in scores.items()}
                          | {f"hparam/baseline_{k}": v for k, v in base.items() if k in run.metric_names}, swept)
        print(f"results: {run_dir}\ntensorboard: {rec.tensorboard_hint(run_dir, RESULTS_DIR)}")
    accelerator.end_training()
    return summary


# ---------------------------------------------------------------------------------------------------
def _default_eval_split(cfg: TrainConfig) -> str:
    from qlora_cls.tasks import GLUE_TASKS
    spec = GLUE_TASKS.get(cfg.task)
    if cfg.train_file:
        return "test" if cfg.trains_on_eval_data else "validation"
    return (spec.test_split if cfg.trains_on_eval_data else spec.validation_split) if spec else "validation"


def _results_dir(cfg, prompt_name, accelerator, broadcast_object_list) -> Path:
    """Check (on every process, before anyone creates it) and then create the run folder."""
    import utils
    if cfg.results_path:
        path = Path(cfg.results_path)
    else:
        stamp = broadcast_object_list([datetime.now().strftime("%Y%m%d-%H%M%S")])[0]
        task = cfg.task if not cfg.train_file else Path(cfg.train_file).stem
        from qlora_cls.methods import run_tag
        path = RESULTS_DIR / f"{task}-{prompt_name}-{run_tag(cfg)}-{stamp}"  # r8 (qlora), lora-r8, adapter-b64...
    utils.check_results_path(path, cfg.resume)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create --results_path {path}: {exc.strerror}")
        if not os.access(path, os.W_OK):
            raise UsageError(f"--results_path {path} is not writable")
    accelerator.wait_for_everyone()
    return path


def optimizer_step(run: Run, trainable, optimizer, scheduler, window, progress: dict, step: int, epoch: int) -> None:
    """Clip, check, step: one host sync per optimizer step (not per micro-batch), since a non-finite step
    must be caught before it reaches the weights."""
    import torch
    from qlora_cls import checkpoint
    cfg = run.cfg
    # Under DeepSpeed the engine clips and steps inside backward() (the optimizer calls below are no-ops)
    # and this returns the norm of the step it just took, as a float.
    grad_norm = torch.as_tensor(run.accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")) or 0.0)
    if torch.isfinite(grad_norm):
        window.grad_norms.append(grad_norm.detach())
        optimizer.step()
        scheduler.step()
    elif cfg.skip_nonfinite:
        progress["skipped_steps"] += 1
        window.grad_norms.clear()
    else:
        raise FloatingPointError(f"non-finite loss/gradient at optimizer step {step} (epoch {epoch}); stopped; the "
                                 f"last good checkpoint is kept in {run.dir / checkpoint.DIR}; rerun with a lower "
                                 f"--lr, or --skip_nonfinite to skip such steps")
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(cfg: TrainConfig, params):
    import torch
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb
    cls = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def save_trained(accelerator, model, path: Path, zero3: bool, cfg: TrainConfig) -> None:
    """The trained weights including the head, as safetensors, atomically (format by method: methods.py)."""
    from qlora_cls.files import crash_safe_dir
    from qlora_cls.methods import save_trainable
    # Under ZeRO-3 the weights are sharded: gathering them is collective, so every process joins.
    state_dict = accelerator.get_state_dict(model) if zero3 else None
    if accelerator.is_main_process:
        with crash_safe_dir(path) as tmp:
            save_trainable(accelerator.unwrap_model(model), tmp, cfg, state_dict)
    accelerator.wait_for_everyone()


class _Window:
    """Training statistics between two log lines, kept on the device (no host sync per micro-batch)."""

    def __init__(self, device):
        import torch
        self.device = device
        self.sums = torch.zeros(2, device=device, dtype=torch.float64)  # loss, real tokens
        self.micro_batches = 0
        self.examples = 0
        self.grad_norms: list = []
        self.started = time.perf_counter()

    def add(self, loss, tokens, examples: int) -> None:
        self.sums[0] += loss.double()
        self.sums[1] += tokens
        self.micro_batches += 1
        self.examples += examples

    def flush(self, accelerator, step: int, epoch: int, lr: float) -> dict:
        import torch
        import utils
        seconds = time.perf_counter() - self.started
        stats = torch.stack([self.sums[0] / max(self.micro_batches, 1), self.sums[1],
                             torch.tensor(float(self.examples), device=self.device, dtype=torch.float64)])
        loss, tokens, examples = accelerator.reduce(stats, reduction="sum").tolist()
        entry = {"step": step, "epoch": epoch, "loss": loss / accelerator.num_processes, "lr": lr,
                 "grad_norm": float(torch.stack(self.grad_norms).mean()) if self.grad_norms else None,
                 "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds,
                 "peak_memory_bytes": utils.peak_memory_bytes(accelerator.device)}
        self.__init__(self.device)
        return entry


class _StopFlag:
    """SIGTERM/SIGINT (what clusters send before pre-emption): finish the step, checkpoint, exit.

    The handler sets Accelerate's trigger; ``check_trigger`` agrees on it across processes (one all-reduce),
    so every process stops at the same step."""

    def __init__(self, accelerator):
        self.accelerator, self.signum = accelerator, 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        self.signum = signum
        self.accelerator.set_trigger()

    def requested(self) -> bool:
        if self.accelerator.check_trigger():
            self.signum = self.signum or signal.SIGTERM  # another process was signalled
        return self.signum != 0


if __name__ == "__main__":
    from qlora_cls.procs import exit_with_parent_if_asked
    exit_with_parent_if_asked()  # launched by sweep.py: end with it (see qlora_cls/procs.py)
    main()
