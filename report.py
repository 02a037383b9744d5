"""Tables and plots comparing the runs under a folder (a sweep, all of results/, or one run).

    python report.py results/<sweep>            # writes results/<sweep>/report/
    python report.py results --out my-report    # every run under results/, grouped by configuration

One row per configuration (its runs over seeds): mean ± std of each metric, trainable parameters,
train time, throughput, peak memory, best epoch, plus the un-tuned base model's rows. Runs that differ
in a field that was not swept are kept in separate rows and flagged. Writes report.md, report.csv,
evals.csv (every adapter under every evaluated prompt) and PNG plots; with runs of two or more --method
values, a method comparison (methods.csv); with step-wise evaluations (--eval_every), the metric against
optimizer step per swept field (eval_vs_step_<field>.png, eval_vs_step.csv). The output folder belongs to
report.py: regenerating replaces its own files, and it refuses a folder holding anything else.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from qlora_cls.cli import OneLineArgumentParser
from qlora_cls import report as rp
from qlora_cls.errors import UsageError
from qlora_cls.files import atomic_write_text

OUTPUTS = ("report.md", "report.csv", "evals.csv", "methods.csv", "eval_vs_step.csv", "eval_per_epoch.png",
           "train_loss.png", "final_metric.png", "prompt_matrix.png")
STEP_FIGURE = re.compile(r"eval_vs_step_[A-Za-z0-9_]+\.png")  # one per swept field


def _ours(name: str) -> bool:
    return name in OUTPUTS or bool(STEP_FIGURE.fullmatch(name))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    parser = OneLineArgumentParser(prog="report.py", description=__doc__, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="sweep folder, results folder or run folder (searched recursively)")
    parser.add_argument("--out", help="output folder (default: <folder>/report)")
    parser.add_argument("--metric", help="metric of the plots (default: the task's main metric)")
    args = parser.parse_args(argv)
    try:
        return write_report(Path(args.folder), Path(args.out) if args.out else None, args.metric)
    except UsageError as exc:
        sys.stderr.write(f"report.py: error: {exc}\n")
        raise SystemExit(2)


def write_report(folder: Path, out: Optional[Path], metric: Optional[str]) -> dict:
    from qlora_cls import plots

    col = rp.collect(folder)
    out = out or folder / "report"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name) and not p.name.startswith(".")) \
        if out.is_dir() else []
    if foreign:
        raise UsageError(f"--out {out} holds files report.py did not write ({', '.join(foreign[:5])}); "
                         f"choose another --out")
    runs = [r for r in col.runs if r.finished]
    metrics = rp.metric_names(runs or col.runs)
    metric = metric or rp.main_metric(runs or col.runs)
    if metric not in metrics:
        raise UsageError(f"--metric {metric}: the runs report {', '.join(metrics) or 'no metrics'}")
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for g in col.groups:
        row = {"label": rp.label(g, col.swept), **{f: g.values.get(f) for f in col.swept},
               "differs_in": "; ".join(f"{k}={rp.value_text(v)}" for k, v in g.differs.items()),
               **rp.group_row(g, metrics), **rp.baseline_columns(g, metrics)}
        row["eval_rows"] = rp.eval_rows(g, metrics, rp.prompt_order(col))
        rows.append(row)
    base = rp.base_rows(col, metrics)
    baselines = rp.baseline_rows(col, metrics)
    problems = rp.sweep_problems(col)
    below = _below_baseline(rows)

    figures = {
        "eval_per_epoch.png": plots.eval_per_epoch(col, metric, out / "eval_per_epoch.png", baselines),
        "train_loss.png": plots.loss_curves(col, out / "train_loss.png", baselines),
        "final_metric.png": plots.final_bars(col, [r for r in rows if r["n_runs"]], base, metric,
                                             out / "final_metric.png", baselines),
        "prompt_matrix.png": plots.prompt_matrix([r for r in rows if r["n_runs"]], base, metric,
                                                 out / "prompt_matrix.png", baselines, col),
    }
    curves = rp.step_curves(col, metric)
    for name, field_curves in curves.items():
        figures[f"eval_vs_step_{name}.png"] = plots.step_curves(col, name, field_curves, metric,
                                                               out / f"eval_vs_step_{name}.png", baselines)
    for old in out.glob("eval_vs_step_*.png"):
        figures.setdefault(old.name, None)
    for name, written in figures.items():
        if written is None:
            (out / name).unlink(missing_ok=True)  # an old figure must not outlive its data
    methods = rp.methods_compared(col)
    method_rows = rp.method_rows(col, metrics) if len(methods) > 1 else []
    if method_rows:
        atomic_write_text(out / "methods.csv", _csv(*_method_table(method_rows, col.swept, metrics, baselines)))
    else:
        (out / "methods.csv").unlink(missing_ok=True)
    if curves:
        atomic_write_text(out / "eval_vs_step.csv", _csv(*_step_table(curves, metric)))
    else:
        (out / "eval_vs_step.csv").unlink(missing_ok=True)
    atomic_write_text(out / "report.csv", _csv(_main_header(col.swept, metrics),
                                               _main_rows(rows, base, col.swept, metrics, baselines)))
    atomic_write_text(out / "evals.csv", _csv(*_eval_table(rows, base, metrics, baselines)))
    atomic_write_text(out / "report.md", _markdown(col, rows, base, problems, metrics, metric,
                                                   [n for n, w in figures.items() if w], baselines, below,
                                                   method_rows, curves))
    for w in col.warnings + below:
        sys.stderr.write(f"report.py: warning: {w}\n")
    print(f"report: {out / 'report.md'} ({len(rows)} configurations, {len(runs)} finished runs"
          f"{f', {len(col.runs) - len(runs)} unfinished' if len(col.runs) > len(runs) else ''})")
    return {"out": out, "rows": rows, "base": base, "baselines": baselines, "warnings": col.warnings,
            "below_baseline": below, "problems": problems, "method_rows": method_rows, "step_curves": curves}


def _below_baseline(rows) -> list[str]:
    """One line per configuration whose mean does not beat the trivial baseline of its eval examples (a generative
    run's: the base model)."""
    out = []
    for r in rows:
        if r.get("beats_baseline") is False:
            m = r["vs_baseline_metric"]
            n = r["n_runs"]
            what = ("does not improve on the base model (un-tuned)" if r["baseline_name"] == BASE_MODEL_NAME else
                    f"does not beat the trivial baseline ({r['baseline_name']})")
            out.append(f"{r['label']} {what}: {m} "
                       f"{r['baseline_' + m] + (-r['vs_baseline_margin'] if rp.lower_is_better(m) else r['vs_baseline_margin']):.4f}"
                       f"{' (mean of ' + str(n) + ' runs)' if n > 1 else ''} against {r['baseline_' + m]:.4f} on the same "
                       f"{r['eval_examples']} {r['eval_split']} examples")
    return out


BASE_MODEL_NAME = rp.baseline_name({"kind": rp.BASE_MODEL})


def _baseline_label(t: dict) -> str:
    """A baseline row's name: a classification run's trivial baseline, or a generative run's base model."""
    return t["name"] if t.get("kind") == rp.BASE_MODEL else f"trivial baseline: {t['name']}"


# -- CSV ------------------------------------------------------------------------------------------------
def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None else v for v in r] for r in rows])
    return buf.getvalue()


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return "+".join(map(str, v)) if all(not isinstance(x, (int, float)) or isinstance(x, bool) for x in v) \
            else ";".join("" if x is None else str(x) for x in v)
    return v


def _main_header(swept: list[str], metrics: list[str]) -> list[str]:
    return (["configuration", *swept, "differs_in", "eval_split", "n_runs", "unfinished", "seeds"]
            + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
            + ["best_epoch", "trainable_params", "total_params", "train_seconds_mean", "examples_per_s_mean",
               "tokens_per_s_mean", "peak_memory_mib_max", "runs"]
            + [f"baseline_{m}" for m in metrics] + ["beats_baseline", "steps", "epochs_trained", "examples_seen",
                                                    "eval_examples", "evaluations", "best_step"])


def _main_rows(rows, base, swept, metrics, baselines) -> list[list[Any]]:
    out = []
    for r in rows:
        out.append([r["label"], *[_cell(r[f]) for f in swept], r["differs_in"], r["eval_split"], r["n_runs"],
                    r["unfinished"], ";".join(map(str, r["seeds"])),
                    *[r[f"{m}_{s}"] for m in metrics for s in ("mean", "std")],
                    ";".join("" if b is None else str(b) for b in r["best_epoch"]), r["trainable_params"],
                    r["total_params"], r["train_seconds_mean"], r["examples_per_s_mean"], r["tokens_per_s_mean"],
                    r["peak_memory_mib_max"], ";".join(r["runs"]),
                    *[r.get(f"baseline_{m}") for m in metrics], r.get("beats_baseline"), r.get("steps"),
                    r.get("epochs_trained"), r.get("examples_seen"), r.get("eval_examples"), r.get("evaluations"),
                    ";".join("" if s is None else str(s) for s in r.get("best_step", []))])
    for b in base:
        out.append([f"{b['label']}, prompt={b['eval_prompt']}", *[b["eval_prompt"] if f == "prompt" else
                                                                  b["classifier"] if f == "classifier" else ""
                                                                  for f in swept],
                    "", b["split"], b["n_runs"], 0, "", *[b[f"{m}_{s}"] for m in metrics for s in ("mean", "std")],
                    "", "", "", "", "", "", "", ";".join(b["sources"]), *[""] * len(metrics), "", "", "", "",
                    b.get("examples"), "", ""])
    for t in baselines:
        out.append([_baseline_label(t), *[""] * len(swept), "", t["split"], "", "", "",
                    *[t[f"{m}_{s}"] for m in metrics for s in ("mean", "std")], "", "", "", "", "", "", "",
                    ";".join(t["sources"]), *[t[f"{m}_mean"] for m in metrics], "", "", "", "", t["examples"], "", ""])
    return out


def _eval_table(rows, base, metrics, baselines) -> tuple[list[str], list[list[Any]]]:
    header = ["configuration", "adapter", "split", "eval_prompt", "n_runs"] + \
             [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + ["examples"] + [f"baseline_{m}" for m in metrics]
    out = []
    for r in rows:
        for e in r["eval_rows"]:
            out.append([r["label"], e["adapter"], e["split"], e["eval_prompt"], e["n_runs"],
                        *[e[f"{m}_{s}"] for m in metrics for s in ("mean", "std")], e.get("examples"),
                        *[e.get(f"baseline_{m}") for m in metrics]])
    for b in base:
        out.append([b["label"], "", b["split"], b["eval_prompt"], b["n_runs"],
                    *[b[f"{m}_{s}"] for m in metrics for s in ("mean", "std")], b.get("examples"),
                    *[b.get(f"baseline_{m}") for m in metrics]])
    for t in baselines:
        out.append([_baseline_label(t), "", t["split"], "", "",
                    *[t[f"{m}_{s}"] for m in metrics for s in ("mean", "std")], t["examples"],
                    *[t[f"{m}_mean"] for m in metrics]])
    return header, out


def _method_table(rows, swept, metrics, baselines) -> tuple[list[str], list[list[Any]]]:
    others = [f for f in swept if f != "method"]
    header = (["method", *others, "differs_in", "n_runs", "seeds", "trainable_params", "total_params",
               "trainable_pct", "adapter_bytes", "adapter_mib", "adapter_bytes_source", "train_seconds_per_epoch_mean",
               "train_seconds_per_epoch_std", "peak_memory_mib_max", "train_tokens_per_s_mean",
               "train_tokens_per_s_std"]
              + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
              + ["vs_baseline_margin", "beats_baseline", "latency_b1_median_ms", "latency_b1_p95_ms",
                 "latency_b8_median_ms", "latency_b8_p95_ms", "runs"])
    out = []
    for r in rows:
        b = r["adapter_bytes_mean"]
        peak = r["peak_memory_bytes_max"]
        out.append([r["method"], *[_cell(r["settings"].get(f)) for f in others],
                    "; ".join(f"{k}={_cell(v)}" for k, v in r["differs"].items()), r["n_runs"],
                    ";".join(map(str, r["seeds"])), r["trainable_params"], r["total_params"], r["trainable_pct"],
                    b, None if b is None else b / 2**20, r["adapter_bytes_source"], r["train_seconds_per_epoch_mean"],
                    r["train_seconds_per_epoch_std"], None if peak is None else peak / 2**20,
                    r["train_tokens_per_s_mean"], r["train_tokens_per_s_std"],
                    *[r[f"{m}_{s}"] for m in metrics for s in ("mean", "std")],
                    r.get("vs_baseline_margin"), r.get("beats_baseline"),
                    *[r[f"latency_b{n}_{s}_mean"] for n in (1, 8) for s in ("median_ms", "p95_ms")],
                    ";".join(r["runs"])])
    for t in baselines:
        out.append([_baseline_label(t), *[""] * len(others), "", "", "", 0, "", 0.0, 0, 0.0, "",
                    "", "", "", "", "", *[t.get(f"{m}_{s}") for m in metrics for s in ("mean", "std")],
                    0.0, "", "", "", "", "", ";".join(t["sources"])])
    return header, out


def _step_table(curves: dict, metric: str) -> tuple[list[str], list[list[Any]]]:
    header = ["field", "value", "differs_in", "averaged_over", "step", "n_runs", f"{metric}_mean", f"{metric}_std",
              f"{metric}_min", f"{metric}_max", "runs"]
    out = []
    for name, field_curves in curves.items():
        for c in field_curves:
            over = "; ".join(f"{k}={'/'.join(map(str, map(_cell, v)))}" for k, v in c["averaged_over"].items())
            differs = "; ".join(f"{k}={_cell(v)}" for k, v in c["differs"].items())
            for i, step in enumerate(c["steps"]):
                out.append([name, _cell(c["value"]), differs, over, step, c["n_series"], c["mean"][i], c["std"][i],
                            c["min"][i], c["max"][i], ";".join(c["runs"])])
    return header, out


# -- Markdown -------------------------------------------------------------------------------------------
def _pm(mean: Optional[float], std: Optional[float], digits: int = 4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _num(v: Optional[float], fmt: str) -> str:
    return "–" if v is None or isinstance(v, str) else format(v, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in esc])


def _signed(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:+.4f}"


def _best_cell(r) -> str:
    """Best epoch only where there was a choice: a run evaluated once (stopped inside its first epoch)
    has nothing selected."""
    cells = []
    for b, step in zip(r["best_epoch"], r.get("best_step") or [None] * len(r["best_epoch"])):
        if b is None:
            cells.append("–")
        elif r.get("evaluations") == 1:
            cells.append("– (1 evaluation)")
        else:
            cells.append(f"{b}" + (f" (step {step})" if step is not None else ""))
    return "/".join(sorted(set(cells))) or "–"


def _sig(v: Optional[float]) -> str:
    """A positive quantity with about three significant digits, never in exponent notation."""
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 0.01 else f"{v:.2g}"


# Method-table columns: (heading with unit, row key, formatter, what an absent value means).
METHOD_COLUMNS = (
    ("adapter on disk (MiB)", "adapter_bytes", lambda v: _sig(v / 2**20)),
    ("train time per epoch (s)", "train_seconds_per_epoch", lambda v: f"{v:,.1f}"),
    ("peak memory (MiB)", "peak_memory_bytes", lambda v: f"{v / 2**20:,.0f}"),
    ("train tokens/s", "train_tokens_per_s", lambda v: f"{v:,.0f}"),
)
LATENCY_COLUMNS = (("latency batch 1 (ms)", "latency_b1_ms"), ("latency batch 8 (ms)", "latency_b8_ms"))


def _method_markdown(col, rows, metric, baselines) -> list[str]:
    others = [f for f in col.swept if f != "method"]
    show_settings = bool(others) or any(r["differs"] for r in rows)
    header = ["method", *(["other settings"] if show_settings else []), "n", "trainable params", "% of model",
              *[c[0] for c in METHOD_COLUMNS], f"{metric} (mean ± std)", *[c[0] for c in LATENCY_COLUMNS]]
    missing: dict[str, list[str]] = {}
    partial: dict[str, list[str]] = {}

    def cell(r, key, fmt):
        n = r[f"{key}_n"]
        name = r["method"] + (f" ({r['label']})" if show_settings else "")
        if n == 0:
            missing.setdefault(key, []).append(name)
            return "– ¹"
        value = r["peak_memory_bytes_max"] if key == "peak_memory_bytes" else r[f"{key}_mean"]
        if n < r["n_runs"]:
            partial.setdefault(key, []).append(name)
            return f"{fmt(value)} ({n} of {r['n_runs']} runs)"
        return fmt(value)

    table = []
    for r in rows:
        settings = ", ".join(f"{k}={rp.value_text(r['settings'].get(k))}" for k in others)
        if r["differs"]:
            settings += " [" + ", ".join(f"{k}={rp.value_text(v)}" for k, v in r["differs"].items()) + "]"
        trainable = r["trainable_params"]
        table.append([r["method"], *([settings] if show_settings else []), str(r["n_runs"]),
                      f"{trainable:,d}" if isinstance(trainable, int) else str(trainable or "–"),
                      "–" if r["trainable_pct"] is None else f"{r['trainable_pct']:.3g} %",
                      *[cell(r, key, fmt) for _, key, fmt in METHOD_COLUMNS],
                      _pm(r[f"{metric}_mean"], r[f"{metric}_std"]) + (" **below baseline**" if r.get("beats_baseline")
                                                                      is False else ""),
                      *[cell(r, key, lambda v: f"{v:,.1f}" if v < 1000 else f"{v:,.0f}") for _, key in LATENCY_COLUMNS]])
    for t in baselines:
        v = t.get(f"{metric}_mean")
        table.append([_baseline_label(t), *([""] if show_settings else []), "–", "0", "0 %", "0",
                      "–", "–", "–", "undefined" if v is None else _pm(v, None), "–", "–"])
    grouping = (f"one row per method and setting of the other swept field(s) ({', '.join(others)}), nothing "
                f"averaged across them" if others else "one row per method")
    lines = ["## Method comparison", "",
             f"Runs grouped by method ({grouping}); every value is over the row's seeds (n): the mean, and for "
             f"{metric} ± its sample standard deviation; peak memory is the largest of the row's runs.", "",
             _table(header, table), "",
             "'% of model': trainable / total parameters (head included; a 4-bit weight counts its real elements). "
             "'adapter on disk': the saved trainable weights (adapter/ without its model card), MiB = 2^20 bytes. "
             "'train time per epoch': train_seconds / epochs trained (fractional). 'train tokens/s': non-padding "
             "training tokens / train_seconds (the configuration table's tokens/s is the mean over log windows). "
             "Latency: median wall time of one forward call over that many eval examples with the final model. "
             "The trivial baseline trains nothing and stores nothing.", ""]
    for key, names in missing.items():
        lines.append(f"¹ '{next(h for h, k, *_ in METHOD_COLUMNS + LATENCY_COLUMNS if k == key)}' not recorded: "
                     f"metrics.json has no {rp.METHOD_FIELDS[key][0]} (older ft.py): {'; '.join(names)}.")
    for key, names in partial.items():
        lines.append(f"'{next(h for h, k, *_ in METHOD_COLUMNS + LATENCY_COLUMNS if k == key)}' over the runs "
                     f"that record it: {'; '.join(names)}.")
    if missing or partial:
        lines.append("")
    sources = {r["adapter_bytes_source"] for r in rows if r["adapter_bytes_source"]}
    if "measured" in "/".join(sources):
        lines += ["Adapter sizes of runs without metrics.json `adapter_bytes` were measured on disk now "
                  "(adapter/ minus README.md): see methods.csv `adapter_bytes_source`.", ""]
    return lines


def _markdown(col, rows, base, problems, metrics, metric, figures, baselines, below, method_rows=(),
              curves=None) -> str:
    runs = [r for r in col.runs if r.finished]
    lines = [f"# Report: {col.root}", "", "## What was run", "", *rp.context_markdown(col),
             f"- **Swept fields:** {', '.join(col.swept) or 'none'}" + (
                 " (inferred: the fields that vary; no sweep.json found)" if col.swept_inferred else ""), ""]
    trivial = [t for t in baselines if t.get("kind") != rp.BASE_MODEL]
    base_model = [t for t in baselines if t.get("kind") == rp.BASE_MODEL]
    for kind, intro in ((trivial, "**Trivial baseline** (what a classifier that never reads the text scores on the "
                                  "same examples; every score below is to be read against it):"),
                        (base_model, f"**Baseline: the base model, un-tuned** ({rp.BASE_MODEL_TEXT}; every score below "
                                     f"is to be read against it; lower perplexity and loss are better):")):
        if not kind:
            continue
        lines += [intro, ""]
        for t in kind:
            shown = [m for m in metrics if t.get(m + "_mean") is not None] if t.get("kind") == rp.BASE_MODEL \
                else metrics + (["mse"] if t.get("kind") == "training_mean" else [])
            values = ", ".join(f"{m} {'undefined' if t.get(m + '_mean') is None else format(t[m + '_mean'], '.4f')}"
                               for m in shown)
            what = t["name"] if t.get("kind") == rp.BASE_MODEL else t["description"]
            lines.append(f"- {what}: {values} on {t['examples']} {t['split']} examples")
        lines.append("")
    if not baselines:
        lines += ["No trivial baseline recorded (these runs predate it); compare with care." if runs else
                  "No run has finished yet: no scores and no trivial baseline to compare them with.", ""]
    for w in below:
        lines.append(f"> **Warning:** {w}.")
    for w in col.warnings:
        lines.append(f"> **Warning:** {w}.")
    if col.warnings or below:
        lines.append("")
    header = ["configuration", "n", *metrics, f"vs baseline ({rows[0].get('vs_baseline_metric') or metric})" if rows
              else "vs baseline", "steps", "best epoch", "trainable params", "train time (s)", "examples/s",
              "tokens/s", "peak memory (MiB)"]
    if any(r["differs_in"] for r in rows):
        header.insert(1, "differs in")
    table = []
    for r in rows:
        margin = r.get("vs_baseline_margin")
        cells = [r["label"], f"{r['n_runs']}" + (f" (+{r['unfinished']} unfinished)" if r["unfinished"] else ""),
                 *[_pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics],
                 _signed(margin) + (" **below**" if r.get("beats_baseline") is False else ""),
                 "–" if r.get("steps") is None else str(r["steps"]),
                 _best_cell(r),
                 _num(r["trainable_params"], ",d") if isinstance(r["trainable_params"], int) else str(r["trainable_params"]),
                 _pm(r["train_seconds_mean"], r["train_seconds_std"], 1), _num(r["examples_per_s_mean"], ".1f"),
                 _num(r["tokens_per_s_mean"], ",.0f"), _num(r["peak_memory_mib_max"], ",.0f")]
        if "differs in" in header:
            cells.insert(1, r["differs_in"] or "")
        table.append(cells)
    for t in baselines:
        cells = [f"{_baseline_label(t)}, {t['split']}, {t['examples']} examples", "–",
                 *[_pm(t[f"{m}_mean"], None) if t.get(f"{m}_mean") is not None else "undefined" for m in metrics],
                 "0", "–", "–", "–", "–", "–", "–", "–"]
        if "differs in" in header:
            cells.insert(1, "")
        table.append(cells)
    for b in base:
        cells = [f"{b['label']}, prompt={b['eval_prompt']}, {b['split']}", str(b["n_runs"]),
                 *[_pm(b[f"{m}_mean"], b[f"{m}_std"]) for m in metrics],
                 _signed(None if b.get(f"{metric}_mean") is None or b.get(f"baseline_{metric}") is None
                         else b[f"{metric}_mean"] - b[f"baseline_{metric}"]), "0", "–", "–", "–", "–", "–", "–"]
        if "differs in" in header:
            cells.insert(1, "")
        table.append(cells)
    lines += ["## Configurations", "", _table(header, table), "",
              "Values are mean ± sample standard deviation (n-1) over seeds of the final adapter on each run's eval "
              "split; a single run shows no ±. 'vs baseline': the mean minus the trivial baseline on the same examples "
              "(for regression: the baseline's mean squared error minus the model's"
              + ("; for a generative run, whose baseline is the base model and whose perplexity is better lower: "
                 "the base model's minus the model's, so positive is better" if rp.generative(col) else "")
              + "). 'steps': optimizer steps "
              "trained. 'best epoch' counts from 1 and names the selected evaluation's step (with --eval_every: the best "
              "of all evaluations, in the epoch it fell in); '– (1 evaluation)': the run was evaluated once (it "
              "trained one epoch or less), so there was no epoch to choose; '–' alone: "
              "no selection (final protocol). Throughput is the mean over training-log windows.", ""]
    if base:
        kinds = {b["classifier"] for b in base}
        how = ("" if rp.generative(col) else " with a freshly initialised classification head" if kinds == {"head"}
               else " scoring each label's words after the prompt (zero-shot)" if kinds == {"label_words"}
               else " with a freshly initialised classification head ('new head') or scoring each label's words "
                    "after the prompt, zero-shot ('label words')")
        lines += ["Base-model rows: the un-tuned model" + how
                  + ", evaluated by `eval.py --base_only` on the same examples (\"before fine-tuning\").", ""]
    eval_table = []
    for r in rows:
        for e in r["eval_rows"]:
            eval_table.append([r["label"], e["eval_prompt"], e["split"] + ("" if e["adapter"] == "adapter" else
                                                                             f" ({e['adapter']})"),
                               str(e["n_runs"]), str(e.get("examples") or "–"),
                               *[_pm(e[f"{m}_mean"], e[f"{m}_std"]) for m in metrics],
                               _pm(e.get(f"baseline_{metric}"), None)])
    if eval_table:
        lines += ["## Every adapter under every evaluated prompt", "",
                  _table(["trained configuration", "evaluated with prompt", "split", "n", "examples", *metrics,
                          f"{'base model' if rp.generative(col) else 'trivial baseline'} ({metric})"], eval_table), ""]
    if method_rows:
        lines += _method_markdown(col, method_rows, metric, baselines)
    step_figures = [n for n in figures if n.startswith("eval_vs_step_")]
    if step_figures:
        lines += ["## Evaluation against optimizer step", "",
                  f"One figure per swept field: {metric} at every evaluation against the optimizer step, one line "
                  "per value of the field (mean over its runs: seeds, and the other fields its sweep varied, named "
                  "in the figure), band ± 1 std; dashed: the trivial baseline. Numbers: eval_vs_step.csv.", ""]
        for name in step_figures:
            field = name[len("eval_vs_step_"):-len(".png")]
            lines += [f"![{metric} against optimizer step by {field}]({name})", ""]
    elif col.swept and runs:
        lines += ["No step-wise evaluations in these runs (ft.py `--eval_every N`), so no per-field curves against "
                  "optimizer step; eval_per_epoch.png has the epoch-end evaluations.", ""]
    reference = "the base model's figure" if rp.generative(col) else "the trivial baseline"
    for name, caption in (("eval_per_epoch.png", f"{metric} at each evaluation, with {reference}"),
                          ("train_loss.png", "training loss"), ("final_metric.png", f"final {metric} per configuration"),
                          ("prompt_matrix.png", f"{metric} of each adapter under each prompt")):
        if name in figures:
            lines += [f"![{caption}]({name})", ""]
    unfinished = [r for r in col.runs if not r.finished]
    if unfinished or problems:
        lines += ["## Not finished or failed", ""]
        lines += [f"- {p}" for p in problems]
        listed = " ".join(problems)
        lines += [f"- {r.path.relative_to(col.root) if r.path != col.root else r.path.name}: unfinished "
                  f"(no metrics.json)" for r in unfinished if f"/{r.path.name}:" not in listed]
        lines.append("")
    differing = [k for g in col.groups for k in g.differs]
    if differing:
        lines += ["Rows flagged in 'differs in' were run with settings the others were not: compare them with care.", ""]
    lines += [f"Generated {datetime.now():%Y-%m-%d %H:%M} by report.py from {len(col.runs)} run folder(s) "
              f"({len(runs)} finished). Files: report.csv (this table, numbers unrounded), evals.csv (every adapter "
              "under every prompt)"
              f"{', methods.csv (the method comparison)' if method_rows else ''}"
              f"{', eval_vs_step.csv (the curves against step)' if curves else ''}. "
              f"{'' if not col.manifests else 'Sweep manifest(s): ' + ', '.join(str(p / 'sweep.json') for p in col.manifests) + '.'}",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
