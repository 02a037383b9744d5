"""Evaluate a finished run on any split and under any prompt template.

    python eval.py --results_path results/<run> [--split test] [--prompt NAME] [--eval_batch_size N]
    python eval.py --results_path results/<run> --base_only     # the un-tuned model ("before fine-tuning")

Everything else (model, quantization, data, task) comes from the run's config.json, and the model is
rebuilt exactly as ft.py built it, so evaluating the run's own split reproduces its final metrics.
Writes evals/<split>-<prompt>[-base]/metrics.json and predictions.csv inside the run folder.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from qlora_cls.cli import parse_dataclass
from qlora_cls.config import EvalConfig, TrainConfig
from qlora_cls.errors import UsageError

log = logging.getLogger("eval")


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        return evaluate_run(parse_dataclass(EvalConfig, argv, "eval.py", __doc__))
    except UsageError as exc:
        sys.stderr.write(f"eval.py: error: {exc}\n")
        raise SystemExit(2)


def load_run_config(run_dir: Path) -> tuple[TrainConfig, dict]:
    from qlora_cls.files import read_json
    if not run_dir.is_dir():
        raise UsageError(f"--results_path {run_dir}: no such folder")
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--results_path {run_dir} has no config.json; is it a run folder written by ft.py?")
    records = read_json(run_dir / "config.json")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in records["config"].items() if k in known}), records


def evaluate_run(ecfg: EvalConfig) -> Optional[dict]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from qlora_cls.data import DataSource
    from qlora_cls.evaluation import predict, prediction_table
    from qlora_cls.files import atomic_dir, atomic_write_csv, atomic_write_json, read_json
    from qlora_cls.metrics import compute_metrics
    from qlora_cls.pipeline import build_model, check_model_paths, prepare_data, tokenizer_for
    from qlora_cls.prompts import load_template, parse_template

    # -- cheap checks: run folder, adapter, template, output folder, model and data sources -------------
    run_dir = Path(ecfg.results_path)
    cfg, records = load_run_config(run_dir)
    resolved = records.get("resolved", {})
    overrides = {"dataset": ecfg.dataset, "model_dir": ecfg.model_dir}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if ecfg.model_dir is not None:
        cfg.tokenizer_dir = ecfg.model_dir
    adapter_dir = run_dir / ecfg.adapter
    summary = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else None
    if not ecfg.base_only and not (adapter_dir / "adapter_config.json").is_file():
        if summary is not None and ecfg.adapter == "adapter_best" and not summary.get("has_adapter_best"):
            raise UsageError(f"{run_dir} has no adapter_best/: its best epoch ({summary.get('best_epoch')}) was the "
                             f"final one, so adapter/ holds it (evaluate with --adapter adapter)"
                             if summary.get("best_epoch") is not None else
                             f"{run_dir} has no adapter_best/: no epoch was selected (final protocol: trained on "
                             f"the validation split); adapter/ holds the last epoch")
        raise UsageError(f"{adapter_dir} has no adapter (adapter_config.json); the run may be unfinished "
                         f"(resume it with ft.py --resume) or use --base_only")
    if summary is None and not ecfg.base_only:
        log.warning("%s has no metrics.json: the run did not finish; evaluating the weights in %s (saved at the "
                    "end of an epoch or by the best-epoch selection), not a final model", run_dir, adapter_dir)
    # By default the evaluation repeats the run's own: its eval split and its number of examples.
    split = ecfg.split or resolved.get("eval_split") or "validation"
    max_samples = cfg.max_eval_samples if ecfg.max_eval_samples is None else (ecfg.max_eval_samples or None)
    if ecfg.prompt is None:
        template = parse_template(resolved.get("prompt_name", "run"),
                                  (run_dir / "prompt.txt").read_text(encoding="utf-8").rstrip("\r\n"))
    else:
        template = load_template(ecfg.prompt, cfg.glue_task)
    suffix = "-base" if ecfg.base_only else ("" if ecfg.adapter == "adapter" else "-best")
    out_dir = Path(ecfg.output_dir) if ecfg.output_dir else run_dir / "evals" / f"{split}-{template.name}{suffix}"
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output_dir {out_dir} is a file; give a folder for metrics.json and predictions.csv")
    if out_dir.exists() and any(out_dir.iterdir()) and not ecfg.overwrite:
        raise UsageError(f"{out_dir} already holds an evaluation; pass --overwrite to replace it "
                         f"or --output_dir to write elsewhere")
    check_model_paths(cfg.model_dir, cfg.tokenizer_dir)

    accelerator = Accelerator(mixed_precision=resolved.get("mixed_precision"))
    cfg.resolve_compute_dtype(accelerator.device.type)  # runs saved before auto existed are concrete already
    model_path, tokenizer = tokenizer_for(cfg)
    data = prepare_data(DataSource.from_config(cfg), template, tokenizer, [split], cfg.max_length,
                        {split: max_samples}, accelerator)
    spec, label_names, template = data.task.spec, data.task.label_names, data.template
    batcher = data.batchers[split]

    # -- model: built like ft.py built it (same seed, so --base_only gets the same fresh head) ---------
    set_seed(cfg.seed)
    model = build_model(cfg, model_path, tokenizer, spec.num_labels, accelerator,
                        adapter_dir=None if ecfg.base_only else str(adapter_dir), base_only=ecfg.base_only)
    batch_size = ecfg.eval_batch_size or cfg.eval_batch_size
    logits, stats = predict(model, batcher, batch_size, accelerator, fast=ecfg.fast_eval)

    scores = compute_metrics(spec, logits, batcher.labels.numpy())  # {} when every label is hidden (-1)
    from qlora_cls import records as rec
    what = "the un-tuned base model" if ecfg.base_only else f"the run's {ecfg.adapter}/"
    baseline, vs_baseline = rec.eval_baseline(spec, cfg, resolved, logits, batcher.labels.numpy(), scores)
    result = {"run": rec.describe_eval(cfg, records, what, split, template.name, len(batcher), max_samples, summary),
              "split": split, "prompt": template.name, "adapter": None if ecfg.base_only else ecfg.adapter,
              "base_only": ecfg.base_only, "examples": len(batcher), "max_eval_samples": max_samples,
              "run_finished": summary is not None, "eval_batch_size": batch_size,
              "metrics": scores, "baseline": baseline, "vs_baseline": vs_baseline, **stats}
    if not scores:
        result["note"] = f"split {split!r} has hidden labels (-1): predictions written, no score"
        log.info(result["note"])
    if accelerator.is_main_process:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out_dir) as tmp:
            header, rows = prediction_table(spec, label_names, batcher, logits)
            atomic_write_csv(tmp / "predictions.csv", header, rows)
            atomic_write_json(tmp / "metrics.json", result)
            (tmp / "prompt.txt").write_text(template.text + "\n", encoding="utf-8")
        if scores:
            print(f"{split} ({template.name}{suffix}): " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items())
                  + f"   trivial baseline ({rec.baseline_line(baseline)})")
            warning = rec.warning_text(vs_baseline, baseline, split, what)
            if warning:
                log.warning(warning)
        print(f"written: {out_dir}")
    return result


if __name__ == "__main__":
    from qlora_cls.procs import exit_with_parent_if_asked
    exit_with_parent_if_asked()  # launched by sweep.py: end with it (see qlora_cls/procs.py)
    main()
