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
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

from qlora_cls.cli import parse_dataclass
from qlora_cls.config import TrainConfig
from qlora_cls.errors import UsageError

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
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from accelerate.utils import broadcast_object_list, set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    import utils
    from qlora_cls import checkpoint
    from qlora_cls.batching import DatasetTooSmall, padding_efficiency, train_batches
    from qlora_cls.data import DataSource, check_trainable
    from qlora_cls.evaluation import predict, prediction_table
    from qlora_cls.hardware import resolve_gradient_checkpointing
    from qlora_cls.files import append_jsonl, atomic_write_csv, atomic_write_json, atomic_write_text
    from qlora_cls.metrics import compute_metrics
    from qlora_cls.modeling import meta_model, parameter_counts, plan_model, quantization_config
    from qlora_cls.pipeline import build_model, check_model_paths, prepare_data, tokenizer_for
    from qlora_cls.preflight import preflight
    from qlora_cls.prompts import load_template
    from qlora_cls import records as rec
    from qlora_cls.tasks import GLUE_TASKS

    # -- 1. Everything cheap first: a bad flag must not cost a model load. ----------------------------
    template = load_template(cfg.prompt, cfg.glue_task)
    check_model_paths(cfg.model_dir, cfg.tokenizer_dir)
    source = DataSource.from_config(cfg)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with="tensorboard",
                              # The run folder is named later (it needs the processes to agree on a time
                              # stamp); the tracker is pointed at it before init_trackers.
                              project_config=ProjectConfiguration(project_dir=str(RESULTS_DIR)))
    cfg.resolve_compute_dtype(accelerator.device.type)
    zero3 = preflight(cfg, accelerator)
    eval_split = cfg.eval_split or _default_eval_split(cfg)
    if eval_split in cfg.train_splits:
        raise UsageError(f"cannot select epochs on {eval_split!r}: it is also trained on (--train_splits "
                         f"{' '.join(cfg.train_splits)}); evaluate on a held-out split with --eval_split")
    if cfg.dry_run:  # memory estimate from shapes on the meta device: no weights are read
        from qlora_cls.memory import dry_run
        return dry_run(cfg, source, template, cfg.train_splits, eval_split, accelerator)
    model_path, tokenizer = tokenizer_for(cfg)
    # MNLI is also scored on its mismatched genres at the end (not when the validation splits are trained on).
    extra_splits = [] if cfg.trains_on_eval_data or cfg.train_file else [
        s for s in GLUE_TASKS[cfg.task].extra_eval_splits if s not in cfg.train_splits + [eval_split]]
    splits = list(dict.fromkeys(cfg.train_splits + [eval_split] + extra_splits))
    data = prepare_data(source, template, tokenizer, splits, cfg.max_length,
                        {s: cfg.max_train_samples for s in cfg.train_splits}
                        | {s: cfg.max_eval_samples for s in [eval_split] + extra_splits}, accelerator)
    spec, label_names, template = data.task.spec, data.task.label_names, data.template
    for s in cfg.train_splits:
        check_trainable(data.task.splits[s], s, cfg.label_column)
    # Head and LoRA targets resolved from the architecture (meta device, no weights read): a bad
    # --target_modules fails here, and config.json records what the presets meant for this model.
    plan = plan_model(meta_model(model_path, spec.num_labels, cfg.trust_remote_code), cfg.target_modules)
    resolve_gradient_checkpointing(cfg, model_path, spec.num_labels,  # auto: from the estimate on a GPU, off on CPU
                                   max(max(data.batchers[s].lengths) for s in cfg.train_splits), accelerator)

    # Final protocol: with the validation split trained on, the only held-out split is the test set, and
    # picking an epoch on it would tune on test data: adapter/ is the last epoch and nothing is selected.
    select_best = not cfg.trains_on_eval_data
    if not select_best:
        log.info("no best-epoch selection: --train_splits %s leaves no held-out validation split (choosing an "
                 "epoch on %s would select on test data); adapter/ holds the last epoch",
                 " ".join(cfg.train_splits), eval_split)
    run_dir = _results_dir(cfg, template.name, accelerator, broadcast_object_list)
    if cfg.resume:
        checkpoint.check_resumable(run_dir, asdict(cfg), plan.target_modules)
    resuming = cfg.resume and bool(checkpoint.checkpoints(run_dir))
    set_seed(cfg.seed)

    # -- 2. Data: one training set from all train splits, tokenized once. ----------------------------
    train_rows = _concat_batchers(data.batchers, cfg.train_splits)
    eval_batcher = data.batchers[eval_split]
    # The trivial baseline: the training labels' majority class (or mean), scored on the eval examples.
    baseline = rec.score_baseline(spec, rec.baseline_rule(spec, train_rows.labels.numpy(), label_names),
                                  eval_batcher.labels.numpy())
    log.info("trivial baseline on the %d %s examples: %s", baseline["eval_examples"], eval_split,
             rec.baseline_line(baseline))
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.gradient_accumulation_steps
    try:
        batches_per_epoch = len(train_batches(train_rows.lengths, cfg.batch_size, cfg.seed, 0, world, rank, accum,
                                              cfg.group_by_length))
    except DatasetTooSmall as exc:
        raise UsageError(f"training data too small: {exc}")
    steps_per_epoch = batches_per_epoch // accum
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch  # --max_steps overrides --epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

    # -- 3. Model: 4-bit base + head + LoRA, on this process's device. -------------------------------
    model = build_model(cfg, model_path, tokenizer, spec.num_labels, accelerator, zero3=zero3, head=plan.head)
    counts = parameter_counts(model)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{counts['trainable']:,}", f"{counts['total']:,}",
             100 * counts["trainable"] / counts["total"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, trainable)
    # The scheduler is stepped by hand once per optimizer step: accelerate's prepared scheduler would
    # step it once per process, which makes warm-up and decay depend on the process count.
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    # -- 4. The run folder: settings first, so a crashed run still says what it was. -----------------
    records = {
        "config": asdict(cfg),
        "resolved": {"model_path": model_path, "eval_split": eval_split, "prompt_name": template.name,
                     "task": spec.name, "num_labels": spec.num_labels, "label_names": label_names,
                     "text_columns": list(spec.text_columns), "metrics": list(spec.metrics),
                     "main_metric": spec.main_metric, "pad_token_id": tokenizer.pad_token_id,
                     **plan.to_dict(), "not_quantized": list(plan.head) if cfg.load_in_4bit else None,
                     "pad_token_in_inputs": data.pad_in_inputs, "parameters": counts,
                     "train_examples": len(train_rows), "eval_examples": len(eval_batcher),
                     "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup_steps,
                     "global_batch_size": cfg.batch_size * world * accum,
                     "mixed_precision": accelerator.mixed_precision, "distributed_type": str(accelerator.distributed_type),
                     "baseline": baseline},
        "environment": {"world_size": world, "packages": utils.package_versions(), "git_commit": utils.git_commit(),
                        "hardware": utils.hardware_info(), "started": datetime.now().isoformat(timespec="seconds")},
    }
    quant = quantization_config(cfg, plan.head)
    quant = quant.to_dict() if quant else {"load_in_4bit": False}
    records = {"run": rec.describe_run(cfg, records["resolved"], quant), **records}  # what was run, at the top
    if accelerator.is_main_process and not resuming:
        atomic_write_json(run_dir / "config.json", records)
        atomic_write_json(run_dir / "quant_config.json", quant)
        lora = accelerator.unwrap_model(model).peft_config["default"].to_dict()
        atomic_write_json(run_dir / "lora_config.json",
                          {k: sorted(v) if isinstance(v, set) else v for k, v in lora.items()})
        atomic_write_text(run_dir / "prompt.txt", template.text + "\n")
    # accelerate's tracker writes to <logging_dir>/<project name>: the events land in the run folder itself,
    # so `tensorboard --logdir results` (or a sweep folder) names the run after its folder.
    accelerator.project_configuration.project_dir = str(run_dir)
    accelerator.project_configuration.logging_dir = str(run_dir.parent)
    accelerator.init_trackers(run_dir.name)
    baseline_scalars = {f"eval/baseline_{k}": v for k, v in baseline["metrics"].items() if v is not None}
    if accelerator.is_main_process:
        rec.tensorboard_layout(accelerator.get_tracker("tensorboard", unwrap=True), spec.metrics, baseline_scalars)
    accelerator.log({**baseline_scalars, "train/baseline_loss": baseline["train_loss"]}, step=0)

    # -- 5. Resume, or start fresh. ------------------------------------------------------------------
    progress = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "history": [], "best": None,
                "train_seconds": 0.0, "skipped_steps": 0}
    if resuming:
        last = checkpoint.checkpoints(run_dir)[-1]
        progress = checkpoint.load(accelerator, last, model, optimizer, scheduler)
        log.info("resumed from %s (step %d)", last.name, progress["global_step"])
    if accelerator.is_main_process and cfg.resume:
        # Steps logged after the checkpoint are trained again: drop their lines so each step appears once.
        checkpoint.truncate_log(run_dir / "train_log.jsonl", progress["global_step"])
    stop = _StopFlag()

    # -- 6. Train. -----------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=progress["global_step"], disable=not accelerator.is_main_process,
               desc="training")
    global_step = progress["global_step"]
    window = _Window(accelerator.device)
    start_epoch = progress["epoch"]
    for epoch in range(start_epoch, epochs):
        model.train()
        batches = train_batches(train_rows.lengths, cfg.batch_size, cfg.seed, epoch, world, rank, accum,
                                cfg.group_by_length)
        if accelerator.is_main_process and epoch == start_epoch:
            all_batches = train_batches(train_rows.lengths, cfg.batch_size, cfg.seed, epoch, world, 0, accum,
                                        cfg.group_by_length)
            records["resolved"]["train_padding_efficiency"] = padding_efficiency(all_batches, train_rows.lengths)
        first = progress["batch_in_epoch"] if epoch == start_epoch else 0
        epoch_started = time.perf_counter()
        for i in range(first, len(batches)):
            batch = {k: v.to(accelerator.device) for k, v in train_rows(batches[i]).items()}
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                # Real tokens from the known lengths, on the host: no device sync per micro-batch.
                window.add(loss.detach(), sum(train_rows.lengths[r] for r in batches[i]), len(batches[i]))
                if accelerator.sync_gradients:
                    # Under DeepSpeed the engine clips and steps inside backward() (the optimizer calls
                    # below are no-ops) and this returns the norm of the step it just took, as a float.
                    grad_norm = torch.as_tensor(
                        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")) or 0.0)
                    # One host sync per optimizer step (not per micro-batch): a non-finite step must be
                    # caught before it reaches the weights.
                    if not torch.isfinite(grad_norm):
                        if not cfg.skip_nonfinite:
                            raise FloatingPointError(
                                f"non-finite loss/gradient at optimizer step {global_step + 1} (epoch {epoch}); "
                                f"stopped; the last good checkpoint is kept in {run_dir / checkpoint.DIR}; "
                                f"rerun with a lower --lr, or --skip_nonfinite to skip such steps")
                        progress["skipped_steps"] += 1
                        optimizer.zero_grad(set_to_none=True)
                        window.grad_norms.clear()
                    else:
                        window.grad_norms.append(grad_norm.detach())
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            bar.update(1)
            progress.update(epoch=epoch, batch_in_epoch=i + 1, global_step=global_step)
            if global_step % cfg.log_every == 0 or global_step == total_steps:
                entry = window.flush(accelerator, global_step, epoch, scheduler.get_last_lr()[0])
                if accelerator.is_main_process:
                    append_jsonl(run_dir / "train_log.jsonl", entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
                accelerator.log({f"train/{k}": v for k, v in entry.items() if k not in ("step", "epoch")}
                                | {"train/baseline_loss": baseline["train_loss"]}, step=global_step)
            if stop.requested(accelerator) or (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0):
                progress["train_seconds"] += time.perf_counter() - epoch_started
                epoch_started = time.perf_counter()
                checkpoint.save(accelerator, run_dir, model, optimizer, scheduler, progress, cfg.keep_checkpoints)
                if stop.signum:
                    log.info("stopped by signal %d at step %d; continue with --resume", stop.signum, global_step)
                    accelerator.end_training()
                    raise SystemExit(128 + stop.signum)
            if global_step >= total_steps:
                break
        progress["train_seconds"] += time.perf_counter() - epoch_started

        # -- evaluation after each epoch (and after the last step when --max_steps ends mid-epoch) ----
        logits, eval_stats = predict(accelerator.unwrap_model(model), eval_batcher, cfg.eval_batch_size, accelerator,
                                     fast=cfg.fast_eval)
        scores = compute_metrics(spec, logits, eval_batcher.labels.numpy()) if accelerator.is_main_process else {}
        scores = broadcast_object_list([scores])[0]
        entry = {"epoch": epoch, "step": global_step, "split": eval_split, **scores, **eval_stats}
        progress["history"].append(entry)
        accelerator.log({f"eval/{k}": v for k, v in entry.items() if k not in ("epoch", "step", "split")}
                        | baseline_scalars, step=global_step)
        if scores:
            log.info("epoch %d (step %d): %s (trivial baseline: %s)", epoch, global_step,
                     ", ".join(f"{k}={scores[k]:.4f}" for k in spec.metrics), rec.baseline_line(baseline))
        elif accelerator.is_main_process:
            log.info("epoch %d: %s has hidden labels: predictions written, no score", epoch, eval_split)
        is_best = select_best and bool(scores) and (progress["best"] is None or scores[spec.main_metric] > progress["best"]["score"])
        if is_best:
            progress["best"] = {"epoch": epoch, "step": global_step, "score": scores[spec.main_metric]}
            _save_adapter(accelerator, model, run_dir / "adapter_best", zero3)
        progress.update(epoch=epoch + 1, batch_in_epoch=0)
        finished = global_step >= total_steps
        if not finished:  # the final state is saved as adapter/ just below
            checkpoint.save(accelerator, run_dir, model, optimizer, scheduler, progress, cfg.keep_checkpoints)
        if finished:
            break
    bar.close()

    # -- 7. Final outputs: adapter/ (final weights) with its metrics and predictions. ------------------
    _save_adapter(accelerator, model, run_dir / "adapter", zero3)
    if os.environ.get("QLORA_DEBUG_RANK_FILES"):  # test hook: every process's final trainable weights
        from safetensors.torch import save_file
        save_file(checkpoint.trainable_state(accelerator.unwrap_model(model)),
                  Path(os.environ["QLORA_DEBUG_RANK_FILES"]) / f"rank{rank}.safetensors")
    # The final weights on the task's other evaluation splits (MNLI mismatched), reported beside the main one.
    extra = {}
    for split in extra_splits:
        extra_logits, extra_stats = predict(accelerator.unwrap_model(model), data.batchers[split],
                                            cfg.eval_batch_size, accelerator, fast=cfg.fast_eval)
        if accelerator.is_main_process:
            extra[split] = {**compute_metrics(spec, extra_logits, data.batchers[split].labels.numpy()), **extra_stats}
            atomic_write_csv(run_dir / f"predictions_{split}.csv",
                             *prediction_table(spec, label_names, data.batchers[split], extra_logits))
            log.info("final weights on %s: %s", split, ", ".join(f"{k}={extra[split][k]:.4f}" for k in spec.metrics))
    final = progress["history"][-1]
    best = progress["best"]
    vs_baseline = rec.compare(spec, scores, baseline, rec.model_mse(logits, eval_batcher.labels.numpy())
                              if spec.is_regression else None)
    summary = {
        "run": rec.describe_run(cfg, records["resolved"], quant, global_step, len(progress["history"])),
        "task": spec.name, "main_metric": spec.main_metric, "eval_split": eval_split,
        "baseline": baseline, "vs_baseline": vs_baseline,
        "epochs": progress["history"],
        "best_epoch": best["epoch"] if best else None, "best_step": best["step"] if best else None,
        "final": {k: v for k, v in final.items()},
        "other_splits": extra,
        "parameters": counts, "train_seconds": progress["train_seconds"], "skipped_steps": progress["skipped_steps"],
        "train_padding_efficiency": records["resolved"].get("train_padding_efficiency"),
        "peak_memory_bytes": max(accelerator.gather_for_metrics([utils.peak_memory_bytes(accelerator.device)],
                                                                use_gather_object=True)),
        "world_size": world,
    }
    if accelerator.is_main_process:
        if best and best["step"] == final["step"]:
            import shutil
            shutil.rmtree(run_dir / "adapter_best", ignore_errors=True)  # identical to adapter/
        summary["has_adapter_best"] = (run_dir / "adapter_best").is_dir()
        header, rows = prediction_table(spec, label_names, eval_batcher, logits)
        atomic_write_csv(run_dir / f"predictions_{eval_split}.csv", header, rows)
        rec.write_model_cards(run_dir, records, quant, template.text, summary, baseline)
        warning = rec.warning_text(vs_baseline, baseline, eval_split, "the final adapter")
        if warning:
            log.warning(warning)
        atomic_write_json(run_dir / "metrics.json", summary)  # last: its presence means the run finished
        swept = rec.swept_fields(run_dir)
        rec.write_hparams(accelerator.get_tracker("tensorboard", unwrap=True),
                          rec.hparams(cfg, records["resolved"], quant, swept),
                          {f"hparam/{k}": v for k, v in scores.items() if k in spec.metrics}
                          | {f"hparam/baseline_{k}": v for k, v in baseline["metrics"].items() if v is not None}, swept)
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
        path = RESULTS_DIR / f"{task}-{prompt_name}-r{cfg.r}-{stamp}"
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


def _concat_batchers(batchers, splits):
    """Training on several splits (final protocol): one Batcher over all of them."""
    if len(splits) == 1:
        return batchers[splits[0]]
    import copy
    import torch
    merged = copy.copy(batchers[splits[0]])
    merged.input_ids = [x for s in splits for x in batchers[s].input_ids]
    merged.lengths = [x for s in splits for x in batchers[s].lengths]
    merged.idx = [x for s in splits for x in batchers[s].idx]
    merged.labels = torch.cat([batchers[s].labels for s in splits])
    return merged


def _optimizer(cfg: TrainConfig, params):
    import torch
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb
    cls = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_adapter(accelerator, model, path: Path, zero3: bool) -> None:
    """Adapter weights including the head (PEFT modules_to_save), as safetensors, atomically."""
    from qlora_cls.files import atomic_dir
    # Under ZeRO-3 the weights are sharded: gathering them is collective, so every process joins.
    state_dict = accelerator.get_state_dict(model) if zero3 else None
    if accelerator.is_main_process:
        with atomic_dir(path) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    accelerator.wait_for_everyone()


class _Window:
    """Training statistics between two log lines, kept on the device (no sync per micro-batch)."""

    def __init__(self, device):
        import torch
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.micro_batches = 0
        self.tokens = 0
        self.examples = 0
        self.grad_norms: list = []
        self.started = time.perf_counter()

    def add(self, loss, tokens: int, examples: int) -> None:
        self.loss_sum += loss.float()
        self.micro_batches += 1
        self.tokens += tokens
        self.examples += examples

    def flush(self, accelerator, step: int, epoch: int, lr: float) -> dict:
        import torch
        import utils
        seconds = time.perf_counter() - self.started
        stats = torch.tensor([self.loss_sum.item() / max(self.micro_batches, 1), self.tokens, self.examples],
                             device=accelerator.device, dtype=torch.float64)
        loss, tokens, examples = accelerator.reduce(stats, reduction="sum").tolist()
        entry = {"step": step, "epoch": epoch, "loss": loss / accelerator.num_processes, "lr": lr,
                 "grad_norm": float(torch.stack(self.grad_norms).mean()) if self.grad_norms else None,
                 "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds,
                 "peak_memory_bytes": utils.peak_memory_bytes(accelerator.device)}
        self.__init__(self.device)
        return entry


class _StopFlag:
    """SIGTERM/SIGINT (what clusters send before pre-emption): finish the step, checkpoint, exit."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.signum != 0
        import torch
        # All processes must stop at the same step, so the flag is agreed on collectively.
        flag = torch.tensor([self.signum], device=accelerator.device)
        self.signum = int(accelerator.reduce(flag, reduction="sum").item() and (self.signum or signal.SIGTERM))
        return self.signum != 0


if __name__ == "__main__":
    from qlora_cls.procs import exit_with_parent_if_asked
    exit_with_parent_if_asked()  # launched by sweep.py: end with it (see qlora_cls/procs.py)
    main()
