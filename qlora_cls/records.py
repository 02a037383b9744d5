"""What a reader needs beside a score: the trivial baseline of the eval examples, and what was run.

*Baseline*: the majority training class (the training mean for regression) scored with the model's metric
code, so a score reads against what ignoring the text gets. *Context*: ``describe_run`` says what was trained
(config.json, metrics.json, report.py, the model card). Details: docs/sweeps-and-reports.md#records-module.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .data import HIDDEN_LABEL, DataSource, load_task_data
from .files import read_json
from .metrics import compute_metrics
from .modelcard import scores_of, write_model_card
from .modeling import EMBEDDED_NAME
from .pipeline import select
from .sweeps import MANIFEST
from .tasks import TaskSpec


# -- the trivial baseline -----------------------------------------------------------------------------
def baseline_rule(spec: TaskSpec, train_labels: Sequence, label_names: Optional[Sequence[str]]) -> dict:
    """The constant a trivial predictor would output, chosen from the training labels only."""
    labels = np.asarray(train_labels, dtype=float)
    labels = labels[labels != HIDDEN_LABEL]
    n = int(labels.size)
    if spec.is_regression:
        mean = float(labels.mean()) if n else 0.0
        var = float(((labels - mean) ** 2).mean()) if n else None
        return {"kind": "training_mean", "prediction": mean, "train_examples": n, "train_loss": var,
                "description": f"always predicts {mean:.4g}, the mean training label ({n} training examples)"}
    counts = np.bincount(labels.astype(int), minlength=spec.num_labels)
    k = int(counts.argmax())  # ties: the lowest label id
    names = list(label_names) if label_names else [str(i) for i in range(spec.num_labels)]
    p = counts / max(counts.sum(), 1)
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    return {"kind": "majority_class", "prediction": k, "prediction_name": names[k], "train_examples": n,
            "train_label_counts": {names[i]: int(c) for i, c in enumerate(counts)}, "train_loss": entropy,
            "description": f"always predicts '{names[k]}', the most frequent class of the {n} training examples "
                           f"({int(counts[k])}, {100 * p[k]:.1f}%)"}


def score_baseline(spec: TaskSpec, rule: dict, eval_labels: Sequence) -> dict:
    """The rule scored on the eval examples (those with a visible label), with the task's GLUE metrics."""
    labels = np.asarray(eval_labels)
    visible = labels != HIDDEN_LABEL
    n = int(visible.sum())
    out = {**rule, "eval_examples": n, "metrics": {}}
    if not n:
        return out
    if spec.is_regression:
        y = labels[visible].astype(float)
        out["metrics"] = {**{m: None for m in spec.metrics}, "mse": float(((y - rule["prediction"]) ** 2).mean())}
        return out
    logits = np.zeros((len(labels), spec.num_labels), dtype=np.float32)
    logits[:, rule["prediction"]] = 1.0
    with warnings.catch_warnings():  # sklearn warns that F1/MCC of a constant divide by zero (they are 0)
        warnings.simplefilter("ignore")
        out["metrics"] = compute_metrics(spec, logits, labels)
    return out


def model_mse(logits: np.ndarray, labels: Sequence) -> Optional[float]:
    labels = np.asarray(labels, dtype=float)
    visible = labels != HIDDEN_LABEL
    if not visible.any():
        return None
    return float(((np.asarray(logits)[:, 0][visible] - labels[visible]) ** 2).mean())


def compare(spec: TaskSpec, scores: dict, baseline: dict, mse: Optional[float] = None) -> dict:
    """Does the model beat the baseline? On the task's main metric; on MSE for regression (whose
    baseline correlation is undefined). ``beats`` is None when there is nothing to compare."""
    metric = "mse" if spec.is_regression else spec.main_metric
    model = mse if spec.is_regression else scores.get(metric)
    base = baseline.get("metrics", {}).get(metric)
    margin = None  # positive = better than the baseline
    if model is not None and base is not None:
        margin = base - model if spec.is_regression else model - base
    return {"metric": metric, "model": model, "baseline": base, "beats": None if margin is None else margin > 0,
            "margin": margin}


def warning_text(cmp: dict, baseline: dict, split: str, what: str = "the model") -> Optional[str]:
    """One line when the model does not beat the baseline; None when it does (or cannot be compared)."""
    if cmp.get("beats") is not False:
        return None
    word = "lower" if cmp["metric"] == "mse" else "higher"
    return (f"{what} does not beat the trivial baseline: {cmp['metric']} {cmp['model']:.4f} against "
            f"{cmp['baseline']:.4f} for a predictor that {baseline.get('description', '?')}, on the same "
            f"{baseline.get('eval_examples')} {split} examples ({word} is better)")


def baseline_line(baseline: dict) -> str:
    """``majority class 'equivalent': accuracy=0.6850, f1=0.8131`` for logs and printouts."""
    name = (f"majority class '{baseline.get('prediction_name')}'" if baseline.get("kind") == "majority_class"
            else f"training mean {baseline.get('prediction', float('nan')):.4g}")
    values = ", ".join(f"{k}={'undefined' if v is None else format(v, '.4f')}"
                       for k, v in baseline.get("metrics", {}).items())
    return f"{name}: {values}"


def rule_from_run_data(cfg) -> dict:
    """For a run saved before config.json recorded its baseline rule: read its training labels again."""
    task = load_task_data(DataSource.from_config(cfg), list(cfg.train_splits))
    labels = []
    for s in cfg.train_splits:
        labels += list(select(task.splits[s], cfg.max_train_samples)[cfg.label_column])
    return baseline_rule(task.spec, labels, task.label_names)


def eval_baseline(spec: TaskSpec, cfg, resolved: dict, logits, labels, scores: dict) -> tuple[dict, dict]:
    """eval.py: the run's baseline rule (config.json; older runs: read from the training data again)
    scored on the examples just evaluated, and the comparison with the model's scores."""
    rule = resolved.get("baseline") or rule_from_run_data(cfg)
    rule = {k: v for k, v in rule.items() if k not in ("eval_examples", "metrics")}
    baseline = score_baseline(spec, rule, labels)
    return baseline, compare(spec, scores, baseline, model_mse(logits, labels) if spec.is_regression else None)


def describe_eval(cfg, records: dict, what: str, split: str, prompt: str, examples: int,
                  max_samples: Optional[int], summary: Optional[dict] = None) -> dict:
    """What an eval.py result is: which weights, trained how (metrics.json; else as planned), scored on what."""
    trained = ((summary or {}).get("run") or {}).get("training") or records.get("run", {}).get("training")
    if what.startswith("the un-tuned"):
        trained = ("not fine-tuned: the base model scoring each label's words (zero-shot)"
                   if getattr(cfg, "classifier", "head") == "label_words" else
                   "not fine-tuned: the base model with a freshly initialised classification head")
    return {"model": model_name(cfg), "model_path": records.get("resolved", {}).get("model_path"),
            "task": task_name(cfg, records.get("resolved", {}).get("task")), "weights": what,
            "trained": trained or "see config.json", "prompt": prompt, "eval_split": split, "eval_examples": examples,
            "eval": f"{'the first' if max_samples else 'all'} {examples} examples of the {split} split"}


# -- what was run -------------------------------------------------------------------------------------
def model_name(cfg) -> str:
    return f"{EMBEDDED_NAME} (embedded)" if cfg.model_dir is None else str(cfg.model_dir)


def method_text(cfg, resolved: dict, quant: Optional[dict]) -> str:
    """``--method`` in words: the base model's precision, what trains on it, the head, a --param_budget's choice."""
    method = cfg.method  # TrainConfig resolves it (runs saved before --method included)
    targets = ", ".join(resolved.get("target_modules") or cfg.target_modules)
    head = ", ".join(resolved.get("head_modules") or []) or "the head"
    if cfg.load_in_4bit:
        q = quant or {}
        base = (f"base model in 4 bit ({q.get('bnb_4bit_quant_type', cfg.bnb_4bit_quant_type).upper()}"
                f"{', double quantization' if q.get('bnb_4bit_use_double_quant', cfg.bnb_4bit_use_double_quant) else ''}"
                f", {cfg.bnb_4bit_compute_dtype} compute)")
    else:
        base = f"base model in {cfg.bnb_4bit_compute_dtype} (not quantized)"
    lora = f"r={cfg.r}, alpha={_num(cfg.lora_alpha)}, dropout {_num(cfg.lora_dropout)} on {targets}"
    what = {"qlora": f"QLoRA: {base}; LoRA {lora}", "lora": f"LoRA: {base}; LoRA {lora}",
            "dora": f"DoRA: {base}; weight-decomposed LoRA {lora}",
            "ia3": f"(IA)^3: {base}; learned scaling vectors on {targets}",
            "adapter": f"bottleneck adapters: {base}; adapters of width {cfg.adapter_bottleneck}"
                       f"{' with their own LayerNorm' if cfg.adapter_layernorm else ''} after each attention and FFN "
                       f"output projection ({targets})",
            "full": f"full fine-tuning: {base}; every weight trained"}[method]
    budget = resolved.get("param_budget")
    if budget:
        what += (f"; --param_budget {budget['budget']:,}: " + (f"{budget['field']}={budget['value']} chosen, " if budget["field"]
                 else "") + f"{budget['trainable']:,} trainable parameters")
    objective = getattr(cfg, "objective", "classification")
    if objective != "classification":
        loss = ("every token of the text" if objective == "lm" else
                "every token, the prompt included" if cfg.train_on_prompt else "the answer tokens and their end of turn")
        return f"{what}; no head: the causal LM trained with the LM loss on {loss}"
    if getattr(cfg, "classifier", "head") == "label_words":
        words = resolved.get("label_words") or cfg.label_words or []
        return (f"{what}; no head: each label scored by its words after the prompt ({', '.join(map(repr, words))}"
                f"{', length-normalised' if cfg.length_normalize else ''}), trained with the LM loss on the gold "
                f"label's words")
    return f"{what}; classification head ({head}) trained in full precision"


def method_short(cfg) -> str:
    """``qlora-4bit-nf4``, ``lora-16bit``, ``dora-4bit-nf4``, ``adapter-16bit``, ``full-16bit``... (HParams)."""
    return f"{cfg.method}-4bit-{cfg.bnb_4bit_quant_type}" if cfg.load_in_4bit else f"{cfg.method}-16bit"


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def task_name(cfg, spec_name: str) -> str:
    return Path(cfg.train_file).stem + " (local files)" if cfg.train_file else spec_name


def describe_run(cfg, resolved: dict, quant: Optional[dict], steps_done: Optional[int] = None,
                 evaluations: Optional[int] = None) -> dict:
    """Model, task, labels, prompt, method, length of training, eval split and size, in words and numbers.

    ``steps_done`` None = planned (config.json, written before training); else what was trained."""
    total = resolved["total_steps"]
    steps = total if steps_done is None else steps_done
    per_epoch = resolved["steps_per_epoch"]
    n_train = resolved["train_examples"]
    gb = resolved["global_batch_size"]
    full, partial = divmod(steps, per_epoch)
    seen = full * n_train + min(partial * gb, n_train)
    epochs = steps / per_epoch
    how = f"set by --max_steps {cfg.max_steps}; --epochs is ignored" if cfg.max_steps else f"--epochs {cfg.epochs}"
    training = (f"{'planned: ' if steps_done is None else ''}{steps} optimizer steps of {gb} examples ({how}) = "
                f"{epochs:.3g} epoch{'s' if epochs != 1 else ''} of the {n_train} training examples "
                f"({per_epoch} steps per epoch), {seen} examples seen")
    if steps_done is not None and steps_done < total:
        training += f"; stopped at step {steps_done} of {total}"
    eval_split, n_eval = resolved["eval_split"], resolved["eval_examples"]
    limit = f"the first {n_eval}" if cfg.max_eval_samples else f"all {n_eval}"
    out = {
        "model": model_name(cfg), "model_path": resolved.get("model_path"),
        "task": task_name(cfg, resolved.get("task")), "labels": resolved.get("label_names"),
        "prompt": resolved.get("prompt_name"), "method": method_text(cfg, resolved, quant),
        "training": training, "steps": steps, "steps_per_epoch": per_epoch, "epochs_trained": round(epochs, 4),
        "examples_seen": seen, "train_examples": n_train, "train_splits": list(cfg.train_splits),
        "eval": f"{limit} examples of the {eval_split} split", "eval_split": eval_split, "eval_examples": n_eval,
    }
    if evaluations is not None:
        out["evaluations"] = evaluations
    return out


def context_line(run: dict) -> str:
    """One line: ``SmolLM2-135M-Instruct (embedded) on mrpc, prompt perfect, 40 steps (0.087 epoch), 200 validation examples``."""
    return (f"{run.get('model')} on {run.get('task')}, prompt {run.get('prompt')}, {run.get('steps')} steps "
            f"({run.get('epochs_trained', 0):.3g} epoch{'s' if run.get('epochs_trained') != 1 else ''}), "
            f"{run.get('eval_examples')} {run.get('eval_split')} examples")


# -- TensorBoard HParams: the settings that tell runs apart, resolved ---------------------------------------
DISTINGUISHING = ("model", "task", "prompt", "method", "r", "lora_alpha", "target_modules", "lr")


def swept_fields(run_dir: Path) -> list[str]:
    """The fields the sweep this run belongs to varies (its sweep.json is in the parent folder)."""
    path = Path(run_dir).parent / MANIFEST
    try:
        return list(read_json(path).get("grid", {}).get("swept", {})) if path.is_file() else []
    except (OSError, ValueError):
        return []


def hparams(cfg, resolved: dict, quant: Optional[dict], swept: Sequence[str]) -> dict:
    """Swept fields first, then the usual distinguishing settings; values as the run resolved them."""
    config = asdict(cfg)
    special = {"model": model_name(cfg), "model_dir": model_name(cfg), "task": task_name(cfg, resolved.get("task")),
               "prompt": resolved.get("prompt_name", cfg.prompt), "method": method_short(cfg),
               "target_modules": resolved.get("target_modules"), "eval_split": resolved.get("eval_split"),
               "max_steps": resolved.get("total_steps"), "global_batch_size": resolved.get("global_batch_size"),
               "mixed_precision": resolved.get("mixed_precision"), "text_columns": resolved.get("text_columns"),
               "label_names": resolved.get("label_names"), "tokenizer_dir": model_name(cfg) if cfg.tokenizer_dir in
               (None, cfg.model_dir) else cfg.tokenizer_dir}
    for k in ("bnb_4bit_quant_storage", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type"):
        if quant and quant.get(k) is not None:
            special[k] = quant[k]
    out = {}
    for name in list(dict.fromkeys([*swept, *DISTINGUISHING])):
        v = special[name] if special.get(name) is not None else config.get(name)
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        elif v is None:
            v = "none"
        elif not isinstance(v, (bool, int, float, str)):
            v = str(v)
        out[name] = v
    return out


def write_hparams(writer, hparams_: dict, metrics: dict, swept: Sequence[str]) -> None:
    """HParams into the run's own event file (so the session is named after the run folder).

    torch's public ``hparams()`` summaries, written as ``SummaryWriter.add_hparams`` writes them
    (``file_writer.add_summary``, then the metrics as scalars), but through the run's own writer:
    ``add_hparams`` opens a second writer in a sub-folder (``<run>/<time>``: a run of its own in TensorBoard).
    TensorBoard shows the columns whose ``differs`` flag is set first and by default; neither torch's
    ``hparams()`` nor TensorBoard's ``hparams_config_pb`` sets it, so the swept fields are marked here.
    """
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as hparams_summary
    exp, ssi, sei = hparams_summary(hparams_, metrics)
    data = plugin_data_pb2.HParamsPluginData.FromString(exp.value[0].metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in swept
    exp.value[0].metadata.plugin_data.content = data.SerializeToString()
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for k, v in metrics.items():
        writer.add_scalar(k, v)
    writer.flush()


def tensorboard_layout(writer, metrics: Sequence[str], baseline_scalars: dict) -> None:
    """Custom Scalars tab: each eval metric in one chart with its baseline, the loss with the constant's."""
    charts = {f"{m} vs trivial baseline": ["Multiline", [f"eval/{m}", f"eval/baseline_{m}"]]
              for m in metrics if f"eval/baseline_{m}" in baseline_scalars}
    charts["training loss vs trivial baseline"] = ["Multiline", ["train/loss", "train/baseline_loss"]]
    writer.add_custom_scalars({"against the baseline": charts})


def tensorboard_hint(run_dir: Path, results_dir: Path) -> str:
    """The command that shows this run under its folder's name (its events are in the folder itself)."""
    parent = Path(run_dir).parent
    if parent.resolve() == Path(results_dir).resolve() or (parent / MANIFEST).is_file():
        return f"tensorboard --logdir {parent}   (this run is '{Path(run_dir).name}', beside the others there)"
    return f"tensorboard --logdir {run_dir}   (or --logdir {parent} to see it named '{Path(run_dir).name}')"


def write_model_cards(run_dir: Path, records: dict, quant: dict, template: str, summary: dict,
                      baseline: dict) -> None:
    """README.md of adapter/ and (when kept) adapter_best/, over PEFT's empty template."""
    spec = TaskSpec(records["resolved"]["task"], tuple(records["resolved"]["text_columns"]),
                    records["resolved"]["num_labels"], tuple(records["resolved"]["metrics"]))
    for which in ("adapter", "adapter_best"):
        if (Path(run_dir) / which).is_dir():
            scores = scores_of(summary, which)
            cmp = summary["vs_baseline"] if which == "adapter" else compare(spec, scores, baseline)
            write_model_card(Path(run_dir) / which, records, quant, template, summary, scores, baseline, which, cmp)
