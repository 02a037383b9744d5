"""Collecting run folders into comparable groups: what ``report.py`` tabulates and plots.

A *run* is a folder with ft.py's config.json; it is finished when its metrics.json exists. Runs are
grouped by their whole configuration except the seed and bookkeeping fields (where results go, how
often to log or checkpoint), so one group = one configuration repeated over seeds. Swept fields come
from the sweep.json manifests above the runs (else: every field that varies). A group that differs
from the others in a field that was *not* swept is kept apart and flagged, never averaged in silently.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import role_fields, with_fields_added_later
from .errors import UsageError
from .files import read_json
from .sweeps import MANIFEST

BOOKKEEPING = role_fields("bookkeeping", "command")  # settings that change neither what a run learns nor its scores
ADAPTER_ONLY = role_fields("adapter")
METHOD_DERIVED = ("load_in_4bit", "target_modules") + ADAPTER_ONLY  # resolved from --method (config.py)
METHOD_ORDER = ("qlora", "lora", "dora", "ia3", "adapter", "full")
SKIP_DIRS = {"adapter", "adapter_best", "checkpoints", "tensorboard", "logs", "evals", "__pycache__", "report"}
# Metrics where lower is better: a regression's MSE and every main metric of the generative objectives
# (generative.MAIN_METRIC: answer_perplexity for sft, perplexity for lm) with the losses behind them.
LOWER_IS_BETTER = {"mse", "answer_perplexity", "answer_loss", "perplexity", "nll"}
BASE_MODEL = "base_model"  # a generative run's baseline kind: the un-tuned base model itself (generative.py)


def lower_is_better(metric: Optional[str]) -> bool:
    return metric in LOWER_IS_BETTER


def method_of(config: dict) -> str:
    """config.method; runs written before it existed were QLoRA with a 4-bit base, else LoRA."""
    m = config.get("method")
    if m:
        return str(m)
    return "qlora" if config.get("load_in_4bit", True) else "lora"


@dataclass
class Run:
    path: Path
    records: dict                      # config.json
    metrics: Optional[dict]            # metrics.json; None = unfinished
    train_log: list[dict]
    evals: list[dict]                  # evals/*/metrics.json of the trained adapter
    sweep: Optional[Path] = None       # folder of the sweep.json this run belongs to

    @property
    def config(self) -> dict:
        return self.records.get("config", {})

    @property
    def resolved(self) -> dict:
        return self.records.get("resolved", {})

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    @property
    def method(self) -> str:
        return method_of(self.config)

    def comparable(self) -> dict:
        """What must be equal for two runs to be seeds of one configuration.

        Fields newer than a run's config.json are read as the behaviour the run had (config.py
        ``with_fields_added_later``), so an older run and a new one with the same settings stay one configuration."""
        c = {k: v for k, v in with_fields_added_later(self.config).items() if k not in BOOKKEEPING and k != "seed"}
        if c.get("tokenizer_dir") == c.get("model_dir"):
            c.pop("tokenizer_dir", None)
        c["method"] = self.method
        if c["method"] != "adapter":  # bottleneck-adapter settings change nothing for the other methods
            for k in ADAPTER_ONLY:
                c.pop(k, None)
        c["world_size"] = self.records.get("environment", {}).get("world_size")  # changes the global batch
        return c


@dataclass
class Group:
    key: str
    values: dict                       # comparable config
    runs: list[Run]
    differs: dict = field(default_factory=dict)   # non-swept field -> this group's value, where it is unusual

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]


@dataclass
class Collection:
    root: Path
    runs: list[Run]
    base_evals: list[dict]             # eval metrics.json with base_only, plus "source"
    manifests: dict[Path, dict]
    swept: list[str]
    swept_inferred: bool
    groups: list[Group]
    warnings: list[str]


def _read(path: Path) -> Optional[Any]:
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def _train_log(path: Path) -> list[dict]:
    """Log entries by step; a resumed run may have logged a step twice (the later entry wins)."""
    entries: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
                entries[int(e["step"])] = e
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
    return [entries[s] for s in sorted(entries)]


def _eval_records(folder: Path, source: str) -> tuple[list[dict], list[dict]]:
    tuned, base = [], []
    for m in sorted(folder.glob("*/metrics.json")):
        data = _read(m)
        if not isinstance(data, dict) or "metrics" not in data:
            continue
        data = {**data, "source": source, "folder": m.parent.name}
        (base if data.get("base_only") else tuned).append(data)
    return tuned, base


def find_runs(root: Path) -> tuple[list[Run], list[dict]]:
    runs, base = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS and not n.startswith("."))
        if "config.json" in filenames:
            records = _read(d / "config.json")
            if isinstance(records, dict) and "config" in records:
                dirnames[:] = []  # nothing inside a run folder is another run
                metrics = _read(d / "metrics.json") if "metrics.json" in filenames else None
                if isinstance(metrics, dict) and "epochs" not in metrics and isinstance(metrics.get("evaluations"), list):
                    # a generative run records its evaluations only; its epoch-end ones, as ft.py lists them
                    # for a classification run (the per-epoch figure reads them)
                    metrics["epochs"] = [e for e in metrics["evaluations"] if e.get("trigger", "epoch") == "epoch"]
                tuned, b = _eval_records(d / "evals", d.name)
                base += b
                runs.append(Run(d, records, metrics if isinstance(metrics, dict) else None,
                                _train_log(d / "train_log.jsonl"), tuned))
                continue
        if MANIFEST in filenames:  # base-model evaluations a sweep keeps beside its runs: <sweep>/base/*
            for n in [n for n in dirnames if n.startswith("base")]:
                dirnames.remove(n)
                base += _eval_records(d / n, f"{d.name}/{n}")[1]
    return runs, base


def _manifest_for(path: Path, cache: dict) -> Optional[Path]:
    for parent in [path, *path.parents]:
        if parent in cache:
            return parent if cache[parent] is not None else None
        data = _read(parent / MANIFEST) if (parent / MANIFEST).is_file() else None
        if data is not None:
            cache[parent] = data
            return parent
    return None


def collect(root: Path) -> Collection:
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is a file; give a sweep, results or run folder" if root.is_file()
                         else f"{root}: no such folder")
    runs, base = find_runs(root)
    if not runs:
        raise UsageError(f"{root} holds no run folders (a folder with ft.py's config.json); "
                         f"give a sweep folder, a results folder or a run folder")
    cache: dict[Path, Any] = {}
    for r in runs:
        r.sweep = _manifest_for(r.path.resolve(), cache)
    manifests = {p: d for p, d in cache.items() if d is not None}
    swept: list[str] = []
    for data in manifests.values():
        for name in data.get("grid", {}).get("swept", {}):
            if name not in swept and name != "seed":
                swept.append(name)
    inferred = not manifests
    comparables = [r.comparable() for r in runs]
    all_keys = sorted({k for c in comparables for k in c})
    varying = [k for k in all_keys if len({json.dumps(c.get(k), sort_keys=True) for c in comparables}) > 1]
    if inferred:
        swept = varying
    groups: dict[str, Group] = {}
    for r, c in zip(runs, comparables):
        key = json.dumps(c, sort_keys=True, default=str)
        groups.setdefault(key, Group(key, c, [])).runs.append(r)
    warnings = []
    # Where --method is swept, the fields it resolves (4 bit or not, ia3's default targets, the adapter's
    # size) differ with it by construction: not a setting the runs silently disagree on.
    derived = METHOD_DERIVED if "method" in swept else ()
    unswept = [k for k in varying if k not in swept and k not in derived]
    for k in unswept:
        counts = Counter(json.dumps(c.get(k), sort_keys=True) for c in comparables)
        reference = counts.most_common(1)[0][0]
        for g in groups.values():
            if json.dumps(g.values.get(k), sort_keys=True) != reference:
                g.differs[k] = g.values.get(k)
        warnings.append(f"runs differ in {k}, which was not swept (most runs: {json.loads(reference)}); "
                        f"they are kept in separate rows, flagged in 'differs in'")
    ordered = sorted(groups.values(), key=lambda g: _order(g, swept, manifests))
    return Collection(root, runs, base, manifests, swept, inferred, ordered, warnings)


def _order(g: Group, swept: list[str], manifests: dict) -> tuple:
    """Rows in the order the grid listed its values (e.g. prompts as given), then by label."""
    return (bool(g.differs), *(_value_key(manifests, name, g.values.get(name)) for name in swept), g.key)


def _word(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "none" if v is None else str(v)


def value_text(v: Any) -> str:
    if isinstance(v, list):
        return "+".join(map(str, v))
    return _word(v)


def label(g: Group, swept: list[str]) -> str:
    text = ", ".join(f"{k}={value_text(g.values.get(k))}" for k in swept) or "all runs"
    if g.differs:
        text += " [" + ", ".join(f"{k}={value_text(v)}" for k, v in g.differs.items()) + "]"
    return text


# -- statistics -----------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n-1); std is None for a single run."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def metric_names(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for r in runs:
        for m in r.resolved.get("metrics", []):
            if m not in names:
                names.append(m)
    return names


def main_metric(runs: list[Run]) -> str:
    counts = Counter(r.resolved.get("main_metric") for r in runs if r.resolved.get("main_metric"))
    return counts.most_common(1)[0][0] if counts else "accuracy"


def throughput(run: Run) -> tuple[Optional[float], Optional[float]]:
    """Mean examples/s and tokens/s over the run's training log windows."""
    ex = [e["examples_per_s"] for e in run.train_log if e.get("examples_per_s") is not None]
    tok = [e["tokens_per_s"] for e in run.train_log if e.get("tokens_per_s") is not None]
    return (statistics.fmean(ex) if ex else None), (statistics.fmean(tok) if tok else None)


def group_row(g: Group, metrics: list[str]) -> dict:
    done = g.finished
    row: dict[str, Any] = {"n_runs": len(done), "unfinished": len(g.runs) - len(done),
                           "seeds": sorted(r.config.get("seed") for r in done),
                           "eval_split": _common(r.metrics.get("eval_split") for r in done),
                           "runs": [r.path.name for r in g.runs]}
    for m in metrics:
        row[f"{m}_mean"], row[f"{m}_std"] = mean_std([r.metrics.get("final", {}).get(m) for r in done])
    best = [None if r.metrics.get("best_epoch") is None else r.metrics["best_epoch"] + 1 for r in done]  # 1 = first
    row["best_epoch"] = best
    row["trainable_params"] = _common(r.metrics.get("parameters", {}).get("trainable") for r in done)
    row["total_params"] = _common(r.metrics.get("parameters", {}).get("total") for r in done)
    row["train_seconds_mean"], row["train_seconds_std"] = mean_std([r.metrics.get("train_seconds") for r in done])
    tp = [throughput(r) for r in done]
    row["examples_per_s_mean"], _ = mean_std([t[0] for t in tp])
    row["tokens_per_s_mean"], _ = mean_std([t[1] for t in tp])
    peaks = [r.metrics.get("peak_memory_bytes") for r in done if r.metrics.get("peak_memory_bytes")]
    row["peak_memory_mib_max"] = max(peaks) / 2**20 if peaks else None
    return row


def _common(values) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    c = Counter(json.dumps(v) for v in values)
    return json.loads(c.most_common(1)[0][0]) if len(c) == 1 else "/".join(sorted(c))


def prompt_order(col: Collection) -> list[str]:
    """Prompts in the order the sweeps listed them (e.g. none, perfect, conflicting, insufficient)."""
    order: list[str] = []
    for data in col.manifests.values():
        names = [w[0] for w in data.get("grid", {}).get("swept", {}).get("prompt", []) if w]
        for name in names + [Path(p).stem for p in data.get("eval_prompts", [])]:
            if name not in order:
                order.append(name)
    return order


def _by_prompt(order: list[str]):
    def key(item):
        (split, prompt, *rest), _ = item
        return (str(split), order.index(prompt) if prompt in order else len(order), str(prompt), str(rest))
    return key


def eval_rows(g: Group, metrics: list[str], order: Optional[list[str]] = None) -> list[dict]:
    """The group's adapters evaluated under each prompt (mean over seeds)."""
    by_key: dict[tuple, list[dict]] = {}
    for r in g.finished:
        for e in r.evals:
            by_key.setdefault((e.get("split"), e.get("prompt"), e.get("adapter")), []).append(e)
    rows = []
    for (split, prompt, adapter), entries in sorted(by_key.items(), key=_by_prompt(order or [])):
        row = {"split": split, "eval_prompt": prompt, "adapter": adapter, "n_runs": len(entries),
               "examples": _common(e.get("examples") for e in entries)}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([e["metrics"].get(m) for e in entries])
            row[f"baseline_{m}"], _ = mean_std([eval_baseline(e).get(m) for e in entries])
        rows.append(row)
    return rows


def eval_baseline(e: dict) -> dict:
    """The baseline figures an eval.py record holds: a classification run's trivial baseline, or for a generative
    run's adapter the base model's figures it was compared with (for --base_only they are the adapter's: none)."""
    if e.get("baseline"):
        return e["baseline"].get("metrics") or {}
    if e.get("objective") not in (None, "classification") and not e.get("base_only"):
        return (e.get("compared_with") or {}).get("metrics") or {}
    return {}


def base_rows(col: Collection, metrics: list[str]) -> list[dict]:
    """The un-tuned model under each prompt ("before fine-tuning"), one row per split, prompt and classifier
    (a new head and label words score the same base model two ways: never averaged together)."""
    by_key: dict[tuple, list[dict]] = {}
    for e in col.base_evals:
        by_key.setdefault((e.get("split"), e.get("prompt"), e.get("examples"), e.get("classifier") or "head"),
                          []).append(e)
    kinds = {k[3] for k in by_key}
    rows = []
    for (split, prompt, examples, kind), entries in sorted(by_key.items(), key=_by_prompt(prompt_order(col))):
        row = {"split": split, "eval_prompt": prompt, "examples": examples, "n_runs": len(entries),
               "sources": sorted({e["source"] for e in entries}), "classifier": kind,
               "label": "base model (un-tuned)" + (f", {BASE_SCORING[kind]}" if kinds != {"head"} else "")}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([e["metrics"].get(m) for e in entries])
            row[f"baseline_{m}"], _ = mean_std([(e.get("baseline") or {}).get("metrics", {}).get(m) for e in entries])
        rows.append(row)
    return rows


BASE_SCORING = {"head": "new head", "label_words": "label words"}  # base rows' labels when not only heads


def sweep_problems(col: Collection) -> list[str]:
    """Points the manifests list as failed or not run, with their error's last line."""
    out = []
    for path, data in col.manifests.items():
        for name, p in data.get("points", {}).items():
            status = p.get("status")
            if (path / name / "metrics.json").is_file() and not p.get("eval_errors"):
                continue
            if status == "failed":
                last = (p.get("error") or "").strip().splitlines()
                out.append(f"{path.name}/{name}: failed ({last[-1] if last else 'no output'})")
            elif p.get("eval_errors"):
                out.append(f"{path.name}/{name}: evaluation failed under {', '.join(p['eval_errors'])}")
            elif not (path / name / "metrics.json").is_file():
                out.append(f"{path.name}/{name}: {status or 'pending'} (not finished; re-run the sweep to continue)")
    return out


# -- what was run, and the trivial baseline ---------------------------------------------------------------
def run_info(r: Run) -> dict:
    """The run's 'run' block (metrics.json: what was trained; else config.json: what was planned), with
    the same keys rebuilt from older run folders that predate it."""
    info = dict(r.records.get("run") or {})
    info.update((r.metrics or {}).get("run") or {})
    res, cfg = r.resolved, r.config
    history = (r.metrics or {}).get("epochs") or []
    if "model" not in info:
        info["model"] = cfg.get("model_dir") or "SmolLM2-135M-Instruct (embedded)"
    info.setdefault("task", res.get("task"))
    info.setdefault("prompt", res.get("prompt_name", cfg.get("prompt")))
    info.setdefault("eval_split", (r.metrics or {}).get("eval_split") or res.get("eval_split"))
    info.setdefault("eval_examples", res.get("eval_examples"))
    if "steps" not in info and history:
        info["steps"] = history[-1].get("step")
    if "epochs_trained" not in info and info.get("steps") and res.get("steps_per_epoch"):
        info["epochs_trained"] = round(info["steps"] / res["steps_per_epoch"], 4)
    every = evaluations_of(r)
    info.setdefault("evaluations", len(every) if every else None)
    return info


def baseline_of(r: Run) -> Optional[dict]:
    return (r.metrics or {}).get("baseline") or r.resolved.get("baseline")


def _distinct(values) -> list:
    out: list = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def context(col: Collection) -> dict[str, list]:
    """Each field of the runs' 'run' blocks with its distinct values (finished runs, else all)."""
    runs = [r for r in col.runs if r.finished] or col.runs
    infos = [run_info(r) for r in runs]
    keys = ("model", "task", "labels", "prompt", "method", "steps", "epochs_trained", "examples_seen", "train_examples",
            "eval_split", "eval_examples", "evaluations")
    return {k: _distinct(i.get(k) for i in infos) for k in keys}


def _one(values: list, fmt=str) -> str:
    return "/".join(fmt(v) for v in values) if values else "?"


def context_line(col: Collection) -> str:
    """Short, for a figure's subtitle."""
    c = context(col)
    epochs = _one(c["epochs_trained"], lambda v: f"{v:.3g}")
    plural = "" if c["epochs_trained"] == [1] else "s"
    return (f"{_one(c['model'])} · {_one(c['task'])} · {_one(c['steps'])} steps ({epochs} epoch{plural}) · "
            f"{_one(c['eval_examples'])} {_one(c['eval_split'])} examples")


def context_markdown(col: Collection) -> list[str]:
    """'What was run' lines for the top of report.md."""
    c = context(col)
    done = [r for r in col.runs if r.finished]
    runs = done or col.runs
    seeds = sorted({len([r for r in g.finished]) for g in col.groups if g.finished})
    epochs = _one(c["epochs_trained"], lambda v: f"{v:.3g}")
    every = sorted({int(r.config.get("eval_every") or 0) for r in runs} - {0})
    when = (f"every {_one(every)} optimizer steps (--eval_every), " if every else "") + \
        "at the end of each epoch and at the last step"
    lines = [f"- **Model:** {_one(c['model'])}",
             f"- **Task:** {_one(c['task'])}" + (f" (labels: {', '.join(c['labels'][0])})" if c["labels"] and
                                                 len(c["labels"]) == 1 and c["labels"][0] else ""),
             f"- **Prompt:** {_one(c['prompt'])}" + (" (swept)" if "prompt" in col.swept else ""),
             f"- **Method:** {_one(c['method'])}" if c["method"] else "- **Method:** see config.json",
             f"- **Training:** {_one(c['steps'])} optimizer steps = {epochs} "
             f"epoch{'' if c['epochs_trained'] == [1] else 's'} of {_one(c['train_examples'])} "
             f"training examples ({_one(c['examples_seen'])} examples seen)",
             f"- **Evaluated on:** {_one(c['eval_examples'])} examples of the {_one(c['eval_split'])} split, "
             f"{_one(c['evaluations'])} evaluation{'' if c['evaluations'] == [1] else 's'} per run "
             f"({when})",
             f"- **Runs:** {len(done)} finished"
             + (f", {len(col.runs) - len(done)} unfinished" if done != col.runs else "")
             + f", {len(col.groups)} configuration(s), "
             f"{_one(seeds)} seed(s) each"]
    return lines


def _baseline_key(b: dict) -> tuple:
    return (b.get("description"), b.get("eval_examples"), json.dumps(b.get("metrics"), sort_keys=True))


def baseline_rows(col: Collection, metrics: list[str]) -> list[dict]:
    """The trivial baseline of each distinct set of eval examples (usually one row)."""
    found: dict[tuple, dict] = {}
    for r in col.runs:
        b = baseline_of(r) if r.finished else None
        if b:
            if b.get("kind") == BASE_MODEL:  # a generative run's: the examples and words are the run's
                b = {**b, "eval_examples": b.get("eval_examples") or run_info(r).get("eval_examples"),
                     "description": b.get("description") or f"the base model, un-tuned ({BASE_MODEL_TEXT})"}
            found.setdefault(_baseline_key(b), {"baseline": b, "split": run_info(r).get("eval_split"),
                                                "sources": []})["sources"].append(r.path.name)
    for e in col.base_evals:
        b = e.get("baseline")
        if b:
            found.setdefault(_baseline_key(b), {"baseline": b, "split": e.get("split"), "sources": []}
                             )["sources"].append(e.get("source"))
    rows = []
    for item in found.values():
        b = item["baseline"]
        row = {"split": item["split"], "examples": b.get("eval_examples"), "description": b.get("description"),
               "kind": b.get("kind"), "name": baseline_name(b), "train_loss": b.get("train_loss"),
               "sources": sorted(set(item["sources"]))}
        for m in [*metrics, "mse"]:
            row[f"{m}_mean"], row[f"{m}_std"] = b.get("metrics", {}).get(m), None
        rows.append(row)
    return rows


BASE_MODEL_TEXT = "the run's model before its first step, scored by the same evaluation on the same prompts"


def baseline_name(b: dict) -> str:
    if b.get("kind") == BASE_MODEL:
        return "the base model (un-tuned)"
    if b.get("kind") == "majority_class":
        return f"always '{b.get('prediction_name')}'"
    return f"always {b.get('prediction', 0):.3g} (training mean)"


def baseline_columns(g: Group, metrics: list[str]) -> dict:
    """Per configuration: the baseline of its eval examples, its runs against it, how long they trained."""
    done = g.finished
    bls = [baseline_of(r) for r in done]
    row: dict[str, Any] = {}
    for m in [*metrics, "mse"]:
        row[f"baseline_{m}"], _ = mean_std([b.get("metrics", {}).get(m) for b in bls if b])
    vs = [vs_baseline(r) for r in done]
    model, _ = mean_std([v.get("model") for v in vs])
    base, _ = mean_std([v.get("baseline") for v in vs])
    metric = _common(v.get("metric") for v in vs)
    row["vs_baseline_metric"] = metric
    row["vs_baseline_margin"] = None if model is None or base is None else (
        base - model if lower_is_better(metric) else model - base)
    row["beats_baseline"] = None if row["vs_baseline_margin"] is None else row["vs_baseline_margin"] > 0
    row["below_baseline_runs"] = sum(1 for v in vs if v.get("beats") is False)
    row["baseline_name"] = _common(baseline_name(b) for b in bls if b)
    infos = [run_info(r) for r in done]
    for k in ("steps", "epochs_trained", "examples_seen", "eval_examples", "evaluations"):
        row[k] = _common(i.get(k) for i in infos)
    row["best_step"] = [(r.metrics or {}).get("best_step") for r in done]
    return row


def vs_baseline(r: Run) -> dict:
    """The run's final model against its baseline: ``metric``, ``model``, ``baseline``, ``beats``. A classification
    run records it so (records.compare); a generative run records every metric's ``model``/``base_model``/``change``,
    read here on its main metric (lower is better)."""
    m = r.metrics or {}
    vs = m.get("vs_baseline") or {}
    if "metric" in vs or m.get("objective") in (None, "classification"):
        return vs
    metric = m.get("main_metric") or r.resolved.get("main_metric")
    entry = vs.get(metric) if isinstance(vs.get(metric), dict) else {}
    model, base = entry.get("model"), entry.get("base_model")
    beats = None if model is None or base is None else (model < base if lower_is_better(metric) else model > base)
    return {"metric": metric, "model": model, "baseline": base, "beats": beats}


def generative(col: Collection) -> bool:
    """Some finished run of the collection is an --objective sft|lm run."""
    return any((r.metrics or {}).get("objective") not in (None, "classification") for r in col.runs if r.finished)


# -- evaluations at optimizer steps (--eval_every) ------------------------------------------------------------
def evaluations_of(r: Run) -> list[dict]:
    """Every evaluation of the run in order: metrics.json `evaluations` (step-wise and epoch-end ones),
    or for runs that predate it the epoch-end `epochs` (each carries its step)."""
    m = r.metrics or {}
    every = m.get("evaluations")
    return list(every) if isinstance(every, list) and every else list(m.get("epochs") or [])


def evaluates_by_step(r: Run) -> bool:
    """The run was evaluated every --eval_every steps (not only at epoch ends)."""
    return bool(r.config.get("eval_every")) or any(e.get("trigger") == "step" for e in evaluations_of(r))


def _swept_in(r: Run, col: Collection) -> list[str]:
    """The fields the run's own sweep varied (a run outside any sweep: the collection's swept fields)."""
    data = col.manifests.get(r.sweep) if r.sweep is not None else None
    if data is None:
        return list(col.swept) if not col.manifests else []
    return [k for k in data.get("grid", {}).get("swept", {}) if k != "seed"]


def step_curves(col: Collection, metric: str) -> dict[str, list[dict]]:
    """Per swept field, one curve per value of it: ``metric`` against optimizer step, over the finished
    runs of the sweeps that varied that field, when any of them was evaluated by step.

    A curve is the mean over its runs (seeds, and the values of the other fields its sweep varied, named
    in ``averaged_over``) at the steps every run of it was evaluated at; groups flagged as differing in a
    field that was not swept get curves of their own. Each curve: value, label, steps, mean, std (sample,
    n-1; None for one run), min, max, n_series, runs, averaged_over."""
    out: dict[str, list[dict]] = {}
    for name in col.swept:
        members = [(g, r) for g in col.groups for r in g.finished if name in _swept_in(r, col)]
        if not any(evaluates_by_step(r) for _, r in members):
            continue
        buckets: dict[str, dict] = {}
        for g, r in members:
            series = {int(e["step"]): e[metric] for e in evaluations_of(r)
                      if e.get(metric) is not None and e.get("step") is not None}
            if not series:
                continue
            value = g.values.get(name)
            key = json.dumps([value, g.differs], sort_keys=True, default=str)
            b = buckets.setdefault(key, {"value": value, "differs": dict(g.differs), "groups": [], "series": [],
                                         "runs": []})
            if g not in b["groups"]:
                b["groups"].append(g)
            b["series"].append(series)
            b["runs"].append(r.path.name)
        curves = []
        for b in buckets.values():
            steps = sorted(set.intersection(*(set(s) for s in b["series"])))
            per_step = [[s[x] for s in b["series"]] for x in steps]
            others = [k for k in col.swept if k != name and
                      len({json.dumps(g.values.get(k), sort_keys=True) for g in b["groups"]}) > 1]
            text = f"{name}={value_text(b['value'])}"
            if b["differs"]:
                text += " [" + ", ".join(f"{k}={value_text(v)}" for k, v in b["differs"].items()) + "]"
            curves.append({"value": b["value"], "differs": b["differs"], "label": text, "steps": steps,
                           "mean": [statistics.fmean(v) for v in per_step],
                           "std": [statistics.stdev(v) if len(v) > 1 else None for v in per_step],
                           "min": [min(v) for v in per_step], "max": [max(v) for v in per_step],
                           "n_series": len(b["series"]), "runs": sorted(b["runs"]),
                           "averaged_over": {k: _distinct(g.values.get(k) for g in b["groups"]) for k in others}})
        curves.sort(key=lambda c: (bool(c["differs"]), _value_key(col.manifests, name, c["value"]), c["label"]))
        if curves:
            out[name] = curves
    return out


def _value_key(manifests: dict, name: str, v: Any) -> tuple:
    """A value's place in the order the grids listed it, then by number, then by text."""
    opts: list = []
    for data in manifests.values():
        opts += [o for o in data.get("grid", {}).get("swept", {}).get(name, []) if o not in opts]
    words = v if isinstance(v, list) else [_word(v)]
    number = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
    return (opts.index(words) if words in opts else len(opts), number, str(v))


# -- method comparison --------------------------------------------------------------------------------------
def adapter_size(r: Run) -> tuple[Optional[int], Optional[str]]:
    """Bytes of the saved trainable weights and where the number comes from: metrics.json `adapter_bytes`
    ("recorded"), else the files in the run's adapter/ except its model card ("measured"), else (None, None)."""
    recorded = (r.metrics or {}).get("adapter_bytes")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        return recorded, "recorded"
    folder = r.path / "adapter"
    if folder.is_dir():
        files = [p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != "README.md"]
        if files:
            return sum(p.stat().st_size for p in files), "measured"
    return None, None


def _seconds_per_epoch(r: Run) -> Optional[float]:
    """metrics.json `train_seconds_per_epoch`, else the same quotient from train_seconds and the epochs
    trained (steps / steps per epoch), which older runs record."""
    m = r.metrics or {}
    if m.get("train_seconds_per_epoch") is not None:
        return m["train_seconds_per_epoch"]
    epochs = m.get("epochs_trained") or run_info(r).get("epochs_trained")
    return m["train_seconds"] / epochs if m.get("train_seconds") is not None and epochs else None


def _latency(r: Run, batch: int, stat: str) -> Optional[float]:
    return (((r.metrics or {}).get("latency") or {}).get(f"batch_{batch}") or {}).get(stat)


# Method-table columns whose value a run may lack (older ft.py): column -> (metrics.json field, reader).
METHOD_FIELDS = {
    "adapter_bytes": ("adapter_bytes and the run has no adapter/ folder", lambda r: adapter_size(r)[0]),
    "train_seconds_per_epoch": ("train_seconds_per_epoch nor train_seconds", _seconds_per_epoch),
    "peak_memory_bytes": ("peak_memory_bytes", lambda r: (r.metrics or {}).get("peak_memory_bytes")),
    "train_tokens_per_s": ("train_tokens_per_s", lambda r: (r.metrics or {}).get("train_tokens_per_s")),
    "latency_b1_ms": ("latency.batch_1", lambda r: _latency(r, 1, "median_ms")),
    "latency_b8_ms": ("latency.batch_8", lambda r: _latency(r, 8, "median_ms")),
}


def methods_compared(col: Collection) -> list[str]:
    """The methods of the finished runs in the usual order; the method table exists when there are two."""
    found = _distinct(r.method for r in col.runs if r.finished)
    return sorted(found, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def method_rows(col: Collection, metrics: list[str]) -> list[dict]:
    """One row per configuration (= method and the values of the other swept fields), ordered by method;
    each value over the configuration's finished runs (seeds). A value some runs lack is over the runs
    that have it (``<column>_n``); a value none has is None."""
    order = methods_compared(col)
    rows = []
    for g in col.groups:
        done = g.finished
        if not done:
            continue
        method = g.values.get("method") or done[0].method
        row: dict[str, Any] = {"method": method, "group": g, "label": label(g, col.swept),
                               "settings": {k: g.values.get(k) for k in col.swept if k != "method"},
                               "differs": dict(g.differs), "n_runs": len(done),
                               "seeds": sorted(r.config.get("seed") for r in done), "runs": [r.path.name for r in done]}
        params = [(r.metrics.get("parameters") or r.resolved.get("parameters") or {}) for r in done]
        row["trainable_params"] = _common(p.get("trainable") for p in params)
        row["total_params"] = _common(p.get("total") for p in params)
        pct = [100.0 * p["trainable"] / p["total"] for p in params if p.get("trainable") is not None and p.get("total")]
        row["trainable_pct"] = statistics.fmean(pct) if pct else None
        for col_name, (_, read) in METHOD_FIELDS.items():
            values = [v for v in (read(r) for r in done) if v is not None]
            row[f"{col_name}_n"] = len(values)
            row[f"{col_name}_mean"], row[f"{col_name}_std"] = mean_std(values)
            if col_name == "peak_memory_bytes":
                row["peak_memory_bytes_max"] = max(values) if values else None
        row["adapter_bytes_source"] = "/".join(sorted({s for s in (adapter_size(r)[1] for r in done) if s})) or None
        for stat in ("median_ms", "p95_ms"):
            for b in (1, 8):
                row[f"latency_b{b}_{stat}_mean"], _ = mean_std([_latency(r, b, stat) for r in done])
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([r.metrics.get("final", {}).get(m) for r in done])
        row.update({k: v for k, v in baseline_columns(g, metrics).items()
                    if k in ("vs_baseline_metric", "vs_baseline_margin", "beats_baseline", "eval_split",
                             "eval_examples")})
        rows.append(row)
    rows.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order),
                             col.groups.index(r["group"])))
    return rows
