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

from .errors import UsageError
from .files import read_json
from .sweeps import MANIFEST

# Settings that do not change what a run learns or how it is scored.
BOOKKEEPING = ("results_path", "resume", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size",
               "skip_nonfinite", "fast_eval")
SKIP_DIRS = {"adapter", "adapter_best", "checkpoints", "tensorboard", "logs", "evals", "__pycache__", "report"}


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

    def comparable(self) -> dict:
        """What must be equal for two runs to be seeds of one configuration."""
        c = {k: v for k, v in self.config.items() if k not in BOOKKEEPING and k != "seed"}
        if c.get("tokenizer_dir") == c.get("model_dir"):
            c.pop("tokenizer_dir", None)
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
        raise UsageError(f"{root}: no such folder")
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
    unswept = [k for k in varying if k not in swept]
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
    grid: dict[str, list] = {}
    for data in manifests.values():
        for name, options in data.get("grid", {}).get("swept", {}).items():
            grid.setdefault(name, []).extend(o for o in options if o not in grid.get(name, []))
    key = []
    for name in swept:
        v = g.values.get(name)
        words = v if isinstance(v, list) else [_word(v)]
        opts = grid.get(name, [])
        number = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
        key.append((opts.index(words) if words in opts else len(opts), number, str(v)))
    return (bool(g.differs), *key, g.key)


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
            row[f"baseline_{m}"], _ = mean_std([(e.get("baseline") or {}).get("metrics", {}).get(m) for e in entries])
        rows.append(row)
    return rows


def base_rows(col: Collection, metrics: list[str]) -> list[dict]:
    """The un-tuned model under each prompt ("before fine-tuning"), one row per split and prompt."""
    by_key: dict[tuple, list[dict]] = {}
    for e in col.base_evals:
        by_key.setdefault((e.get("split"), e.get("prompt"), e.get("examples")), []).append(e)
    rows = []
    for (split, prompt, examples), entries in sorted(by_key.items(), key=_by_prompt(prompt_order(col))):
        row = {"split": split, "eval_prompt": prompt, "examples": examples, "n_runs": len(entries),
               "sources": sorted({e["source"] for e in entries})}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([e["metrics"].get(m) for e in entries])
            row[f"baseline_{m}"], _ = mean_std([(e.get("baseline") or {}).get("metrics", {}).get(m) for e in entries])
        rows.append(row)
    return rows


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
    info.setdefault("evaluations", len(history) if history else None)
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
    runs = [r for r in col.runs if r.finished] or col.runs
    seeds = sorted({len([r for r in g.finished]) for g in col.groups if g.finished})
    epochs = _one(c["epochs_trained"], lambda v: f"{v:.3g}")
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
             f"(evaluations come at the end of each epoch and at the last step)",
             f"- **Runs:** {len(runs)} finished, {len(col.groups)} configuration(s), "
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


def baseline_name(b: dict) -> str:
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
    vs = [(r.metrics or {}).get("vs_baseline") or {} for r in done]
    model, _ = mean_std([v.get("model") for v in vs])
    base, _ = mean_std([v.get("baseline") for v in vs])
    metric = _common(v.get("metric") for v in vs)
    row["vs_baseline_metric"] = metric
    row["vs_baseline_margin"] = None if model is None or base is None else (
        base - model if metric == "mse" else model - base)
    row["beats_baseline"] = None if row["vs_baseline_margin"] is None else row["vs_baseline_margin"] > 0
    row["below_baseline_runs"] = sum(1 for v in vs if v.get("beats") is False)
    row["baseline_name"] = _common(baseline_name(b) for b in bls if b)
    infos = [run_info(r) for r in done]
    for k in ("steps", "epochs_trained", "examples_seen", "eval_examples", "evaluations"):
        row[k] = _common(i.get(k) for i in infos)
    row["best_step"] = [(r.metrics or {}).get("best_step") for r in done]
    return row
