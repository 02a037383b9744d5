"""Evaluate a finished run on any split and under any prompt template.

    python eval.py --results_path results/<run> [--split test] [--prompt NAME] [--eval_batch_size N]
    python eval.py --results_path results/<run> --base_only     # the un-tuned model ("before fine-tuning")
    python eval.py --results_path results/<run1> results/<run2> ...   # several runs on one base: loaded once
    python eval.py --results_path merged/<folder> --dataset ../shared/data/glue   # a merge.py folder

Everything else (model, quantization, data, task) comes from the run's config.json, and the model is
rebuilt exactly as ft.py built it, so evaluating the run's own split reproduces its final metrics.
Several runs trained on the same base (model, quantization, compute dtype, head) share one loaded base:
each adapter is added with PEFT's load_adapter and selected with set_adapter (head included), and each
run's outputs are what evaluating it alone writes. A merged folder (qlora_cls.json) is loaded with plain
transformers; its GLUE task's data come from --dataset (default: the hub's nyu-mll/glue).
Writes evals/<split>-<prompt>[-base]/metrics.json and predictions.csv inside each run folder.

A generative run (ft.py --objective sft|lm) is scored on its own held-out data, rebuilt as ft.py built them
(qlora_cls/generative.py ``prepare`` with the saved config) by the evaluation ft.py ran (``evaluate``): answer
loss and perplexity and generations (sft: evals/validation-<chat template>[-base|-best]/metrics.json and
generations_validation.jsonl), or the sliding-window perplexity (lm); printed beside the base model's figures.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from qlora_cls.cli import parse_dataclass
from qlora_cls.config import EvalConfig
from qlora_cls.errors import UsageError

log = logging.getLogger("eval")


def main(argv: Optional[Sequence[str]] = None):
    """One run: its result dict; several runs: the list of their result dicts, in --results_path order."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        results = evaluate_runs(parse_dataclass(EvalConfig, argv, "eval.py", __doc__))
    except UsageError as exc:
        sys.stderr.write(f"eval.py: error: {exc}\n")
        raise SystemExit(2)
    return results[0] if len(results) == 1 else results


def evaluate_run(ecfg: EvalConfig) -> Optional[dict]:
    """Kept for callers of the one-run form."""
    return evaluate_runs(ecfg)[0]


def _plan(ecfg: EvalConfig, source) -> dict:
    """Cheap checks of one folder: what to evaluate, with which template, written where."""
    import dataclasses

    from qlora_cls.prompts import load_template
    from qlora_cls.runs import merged_eval_config

    if source.kind == "merged":
        cfg = merged_eval_config(source, ecfg.dataset)
        resolved = {"model_path": str(source.path), "task": source.task, "eval_split": cfg_split(cfg),
                    "baseline": source.records.get("baseline") if "kind" in (source.records.get("baseline") or {})
                    else None}
        records = {"resolved": resolved, "run": {"training": (
            f"merged from run {source.records.get('source_run')} ({source.records.get('merged_into')})")}}
        max_samples = ecfg.max_eval_samples or None
    else:
        cfg, records, resolved = source.cfg, source.records, source.resolved
        # By default the evaluation repeats the run's own: its eval split and its number of examples.
        max_samples = cfg.max_eval_samples if ecfg.max_eval_samples is None else (ecfg.max_eval_samples or None)
    cfg, name_tag = _scoring(ecfg, source, cfg)
    split = ecfg.split or resolved.get("eval_split") or "validation"
    template = source.template if ecfg.prompt is None else load_template(ecfg.prompt, cfg.glue_task)
    if not ecfg.base_only and cfg.classifier == "label_words" and not cfg.label_words:
        # a trained model keeps the words it was trained on (its label names), whatever --prompt's file names
        template = dataclasses.replace(template, label_words=None)
    suffix, out_dir = _out_dir(ecfg, source, split, template.name + name_tag, "predictions.csv")
    return {"source": source, "cfg": cfg, "records": records, "resolved": resolved, "split": split,
            "max_samples": max_samples, "template": template, "suffix": suffix, "out_dir": out_dir}


def _scoring(ecfg: EvalConfig, source, cfg):
    """The run's config with --classifier/--label_words/--length_normalize applied (checked as ft.py checks
    them: a regression task refuses label words in one line), and the tag its evaluation folder gets when
    the classifier is not the run's (``-label_words``: a head run's base scored zero-shot by label words)."""
    import dataclasses
    overrides = ecfg.scoring_overrides()
    if not overrides:
        return cfg, ""
    own = cfg.classifier
    wanted = overrides.get("classifier", own)
    if wanted != own and not ecfg.base_only:
        raise UsageError(f"--classifier {wanted}: {source.path} was trained with --classifier {own}, and its "
                         f"{'merged weights' if source.kind == 'merged' else ecfg.adapter + '/'} belong to that "
                         f"classifier; score the un-tuned base model with --classifier {wanted} --base_only")
    if wanted == "head" and ("label_words" in overrides or "length_normalize" in overrides):
        raise UsageError("--label_words and --length_normalize apply to --classifier label_words")
    if wanted == "head" and own == "label_words":
        overrides = {**overrides, "label_words": None, "length_normalize": False}
    cfg = dataclasses.replace(cfg, **overrides)  # __post_init__ checks them, as on ft.py's command line
    if source.kind == "run":
        source.cfg = cfg  # the model is built from it (runs.load_models): the causal LM for label words
    return cfg, "" if wanted == own else f"-{wanted}"


def cfg_split(cfg) -> str:
    from qlora_cls.tasks import GLUE_TASKS
    return GLUE_TASKS[cfg.task].validation_split


def evaluate_runs(ecfg: EvalConfig) -> list[dict]:
    from accelerate import Accelerator

    from qlora_cls.data import DataSource
    from qlora_cls.evaluation import predict
    from qlora_cls.label_words import LabelWords
    from qlora_cls.pipeline import prepare_data
    from qlora_cls.runs import check_model_sources, check_same_base, load_models, open_source, tokenizer_of

    # -- cheap checks for every folder: sources, adapters, templates, output folders, shared base --------
    if len(ecfg.results_path) > 1:
        if ecfg.output_dir:
            raise UsageError("--output_dir takes one run; with several --results_path each run's evaluation goes "
                             "into its own evals/ folder")
        if ecfg.base_only:
            raise UsageError("--base_only takes one run: the un-tuned base is the same for runs on one base")
    sources = [open_source(p, ecfg.adapter, ecfg.base_only, ecfg.model_dir, ecfg.dataset, generative=True)
               for p in ecfg.results_path]
    generative = [s for s in sources if s.template is None]
    if generative:
        if len(sources) > 1:
            raise UsageError(f"{generative[0].path} is an --objective {generative[0].cfg.objective} run: evaluate "
                             f"generative runs one at a time (one --results_path)")
        return [evaluate_generative(ecfg, sources[0])]
    check_same_base(sources)
    plans = [_plan(ecfg, s) for s in sources]
    check_model_sources(sources)

    first = plans[0]
    accelerator = Accelerator(mixed_precision=first["resolved"].get("mixed_precision"))
    ecfg.resolve_auto(accelerator.device.type)
    for p in plans:
        p["cfg"].resolve_auto(accelerator.device.type)  # runs saved before auto existed are concrete
        p["model_path"], p["tokenizer"] = tokenizer_of(p["source"])
        p["data"] = prepare_data(DataSource.from_config(p["cfg"]), p["template"], p["tokenizer"], [p["split"]],
                                 p["cfg"].max_length, {p["split"]: p["max_samples"]}, accelerator,
                                 label_words=LabelWords.of(p["cfg"]))
    pad_ids = {p["tokenizer"].pad_token_id for p in plans}
    if len(pad_ids) > 1:
        raise UsageError(f"the runs' tokenizers pad with different token ids ({', '.join(map(str, sorted(pad_ids)))}); "
                         f"one loaded base model knows one pad id")

    # -- model: built like ft.py built it (same seed, so --base_only gets the same fresh head) -----------
    loaded = load_models(sources, first["model_path"], first["tokenizer"], accelerator)
    results = []
    for i, p in enumerate(plans):
        loaded.use(i)
        batch_size = ecfg.eval_batch_size or p["cfg"].eval_batch_size
        logits, stats = predict(loaded.model, p["data"].batchers[p["split"]], batch_size, accelerator,
                                fast=ecfg.fast_eval, stream_dtype=ecfg.eval_stream_dtype)
        results.append(_write(ecfg, p, logits, stats, batch_size, accelerator))
    line = loaded.timing_line()
    if line:
        log.info(line)
        for r in results:
            r["adapter_switch"] = {"adapters": len(loaded.adapter_names), "load_seconds": loaded.load_seconds,
                                   "switch_seconds": loaded.switch_seconds}
    return results


def evaluate_generative(ecfg: EvalConfig, source) -> dict:
    """One --objective sft|lm run: its held-out data and model rebuilt as ft.py built them, scored by the same
    ``generative.evaluate``, so the final adapter's figures are metrics.json's (with the run's --fast_eval)."""
    from contextlib import nullcontext

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from qlora_cls import generative
    from qlora_cls import records as rec
    from qlora_cls.files import atomic_write_json, crash_safe_dir
    from qlora_cls.merging import check_chat_format, generative_scores
    from qlora_cls.pipeline import build_model, check_model_paths, tokenizer_for

    cfg, resolved, summary = source.cfg, source.resolved, source.summary
    split = resolved.get("eval_split") or "validation"
    refused = [f"--{name} {value}" for name, value in (
        ("split", None if ecfg.split in (None, split) else ecfg.split), ("prompt", ecfg.prompt),
        ("dataset", ecfg.dataset), ("eval_stream_dtype", None if ecfg.eval_stream_dtype == "float32"
                                    else ecfg.eval_stream_dtype)) if value is not None]
    if refused:
        raise UsageError(f"{refused[0]}: {source.path} is an --objective {cfg.objective} run, scored on its own "
                         f"held-out {split} data with its own chat format; that flag applies to classification runs")
    name = resolved.get("prompt_name") or cfg.objective
    suffix, out_dir = _out_dir(ecfg, source, split, name, "the generations")
    check_model_paths(cfg.model_dir, cfg.tokenizer_dir)
    run_max_eval = cfg.max_eval_samples
    if ecfg.max_eval_samples is not None:  # none: as the run did; 0: every held-out example
        cfg.max_eval_samples = ecfg.max_eval_samples or None
    cfg.eval_batch_size = ecfg.eval_batch_size or cfg.eval_batch_size
    accelerator = Accelerator(mixed_precision=resolved.get("mixed_precision"))
    ecfg.resolve_auto(accelerator.device.type)
    cfg.resolve_auto(accelerator.device.type)
    cfg.fast_eval = ecfg.fast_eval
    model_path, tokenizer = tokenizer_for(cfg)
    data = generative.prepare(cfg, tokenizer)  # sets the chat template and adds its markers, as in ft.py
    if data.fmt is not None:
        check_chat_format(data.fmt, tokenizer, source.records, model_path)
    set_seed(cfg.seed)
    model = build_model(cfg, model_path, tokenizer, None, accelerator,
                        adapter_dir=None if ecfg.base_only else str(source.adapter_dir), base_only=ecfg.base_only,
                        new_tokens=data.fmt.added_tokens if data.fmt else ())
    what = "the un-tuned base model" if ecfg.base_only else f"the run's {ecfg.adapter}/"
    main = accelerator.is_main_process
    if main:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    with crash_safe_dir(out_dir) if main else nullcontext() as tmp:
        scores = generative.evaluate(cfg, model, data, tokenizer, accelerator, tmp, split)
        # the other side: the base model's figures (metrics.json) beside the adapter's, the adapter's beside the base's
        other_name = "the run's final adapter" if ecfg.base_only else "the base model"
        other = (generative_scores(summary or {}, "adapter") if ecfg.base_only
                 else ((summary or {}).get("baseline") or {}).get("metrics") or {})
        hidden = ""
        if cfg.max_eval_samples != run_max_eval:  # metrics.json scored other examples: no side-by-side figures
            hidden = (f"{other_name} is not shown: metrics.json scored {_first(run_max_eval)} held-out examples, this "
                      f"evaluation {_first(cfg.max_eval_samples)}; evaluate the other side with the same "
                      f"--max_eval_samples to compare")
            other_name, other = hidden, {}
        names = [k for k in (resolved.get("metrics") or scores) if k in scores]
        run_info = rec.describe_eval(cfg, source.records, what, split, name, len(data.eval), cfg.max_eval_samples,
                                     summary)
        if ecfg.base_only:
            run_info["trained"] = "not fine-tuned: the base model"
        result = {"run": run_info, "objective": cfg.objective, "split": split, "prompt": name,
                  "adapter": None if ecfg.base_only else ecfg.adapter, "base_only": ecfg.base_only,
                  "examples": len(data.eval), "max_eval_samples": cfg.max_eval_samples,
                  "run_finished": summary is not None, "eval_batch_size": cfg.eval_batch_size, "fast_eval": cfg.fast_eval,
                  "metrics": scores, "compared_with": {"what": other_name + " (metrics.json)", "metrics": other}}
        if main:
            atomic_write_json(tmp / "metrics.json", result)
    if main:
        line = ", ".join(f"{k}={scores[k]:.4f}" for k in names)
        known = [k for k in names if other.get(k) is not None]
        print(f"{split} ({name}{suffix}): {line}" + (f"   {other_name}: " + ", ".join(
            f"{k}={other[k]:.4f}" for k in known) if known else f"   ({hidden})" if hidden else ""))
        print(f"written: {out_dir}")
    return result


def _first(n) -> str:
    return "all" if n is None else f"the first {n}"


def _write(ecfg: EvalConfig, p: dict, logits, stats: dict, batch_size: int, accelerator) -> dict:
    from qlora_cls import records as rec
    from qlora_cls.evaluation import prediction_table
    from qlora_cls.files import crash_safe_dir, atomic_write_csv, atomic_write_json
    from qlora_cls.metrics import compute_metrics

    data, split, cfg, source = p["data"], p["split"], p["cfg"], p["source"]
    spec, label_names, template = data.task.spec, data.task.label_names, data.template
    batcher = data.batchers[split]
    scores = compute_metrics(spec, logits, batcher.labels.numpy())  # {} when every label is hidden (-1)
    if source.kind == "merged":
        what = f"the merged model in {source.path}"
    else:
        what = "the un-tuned base model" if ecfg.base_only else f"the run's {ecfg.adapter}/"
    baseline, vs_baseline = rec.eval_baseline(spec, cfg, p["resolved"], logits, batcher.labels.numpy(), scores)
    result = {"run": rec.describe_eval(cfg, p["records"], what, split, template.name, len(batcher), p["max_samples"],
                                       source.summary),
              "split": split, "prompt": template.name,
              "adapter": None if ecfg.base_only or source.kind == "merged" else ecfg.adapter,
              "base_only": ecfg.base_only, "examples": len(batcher), "max_eval_samples": p["max_samples"],
              "run_finished": source.summary is not None or source.kind == "merged", "eval_batch_size": batch_size,
              "metrics": scores, "baseline": baseline, "vs_baseline": vs_baseline, **stats}
    result["classifier"] = cfg.classifier  # report.py keeps the base model's head and label-word scores apart
    if data.words is not None:  # --classifier label_words: the words this evaluation scored
        result["label_words"] = data.words
    if source.kind == "merged":
        result["merged"] = {k: source.records.get(k) for k in ("source_run", "merged_into", "base_model", "dtype")}
    if not scores:
        result["note"] = f"split {split!r} has hidden labels (-1): predictions written, no score"
        log.info(result["note"])
    out_dir = p["out_dir"]
    if accelerator.is_main_process:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with crash_safe_dir(out_dir) as tmp:
            header, rows = prediction_table(spec, label_names, batcher, logits)
            atomic_write_csv(tmp / "predictions.csv", header, rows)
            atomic_write_json(tmp / "metrics.json", result)
            (tmp / "prompt.txt").write_text(template.text + "\n", encoding="utf-8")
        name = "" if len(ecfg.results_path) == 1 else f"{source.path}: "
        if scores:
            print(f"{name}{split} ({template.name}{p['suffix']}): " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items())
                  + f"   trivial baseline ({rec.baseline_line(baseline)})")
            warning = rec.warning_text(vs_baseline, baseline, split, what)
            if warning:
                log.warning(warning)
        print(f"written: {out_dir}")
    return result


def _out_dir(ecfg: EvalConfig, source, split: str, name: str, what: str) -> tuple[str, Path]:
    """The evaluation's folder (evals/<split>-<prompt or chat template>[-base|-best], or --output_dir), checked:
    a folder, and not an earlier evaluation unless --overwrite."""
    suffix = "-base" if ecfg.base_only else ("" if ecfg.adapter == "adapter" else "-best")
    out_dir = Path(ecfg.output_dir) if ecfg.output_dir else source.path / "evals" / f"{split}-{name}{suffix}"
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output_dir {out_dir} is a file; give a folder for metrics.json and {what}")
    if out_dir.exists() and any(out_dir.iterdir()) and not ecfg.overwrite:
        raise UsageError(f"{out_dir} already holds an evaluation; pass --overwrite to replace it "
                         f"or --output_dir to write elsewhere")
    return suffix, out_dir

if __name__ == "__main__":
    from qlora_cls.procs import exit_with_parent_if_asked
    exit_with_parent_if_asked()  # launched by sweep.py: end with it (see qlora_cls/procs.py)
    main()
