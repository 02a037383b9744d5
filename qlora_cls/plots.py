"""The report's figures (matplotlib, no display needed): evaluation per epoch, evaluation against step per
swept field, training loss, final bars, prompt matrix.

Each figure is titled, has labelled axes with units and a legend outside the plotting area (long
configuration names never cover the data); lines are the mean over seeds, bands +-1 std.
"""
from __future__ import annotations

import io
import math
import statistics
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from .report import Collection, Group, label  # noqa: E402

DPI = 120
BOUNDED = {"accuracy", "f1", "matthews_correlation", "pearson", "spearmanr"}
ZERO_ONE = {"accuracy", "f1"}


def _unit(metric: str) -> str:
    return f"{metric} (0-1)" if metric in ZERO_ONE else (f"{metric} (-1 to 1)" if metric in BOUNDED else metric)


def _save(fig, path: Path) -> Path:
    from .files import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _figure(lines: int):
    """A wide figure for step curves, and a colour map with enough colours for ``lines`` lines."""
    fig, ax = plt.subplots(figsize=(10, 4.8), layout="constrained")
    return fig, ax, plt.get_cmap("tab10" if lines <= 10 else "tab20")


def _finish_steps(fig, ax, ylabel: str, path: Path, legend: str = "configuration") -> Path:
    """Optimizer steps on x (whole numbers), grid, legend outside the plot; saved."""
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize="small",
                  title=legend, title_fontsize="small")
    return _save(fig, path)


def _aggregate(series: list[dict[float, float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over runs at the x values every run has (resumed or cut runs may miss some)."""
    xs = sorted(set.intersection(*(set(s) for s in series))) if series else []
    means = [statistics.fmean(s[x] for s in series) for x in xs]
    stds = [statistics.stdev(s[x] for s in series) if len(series) > 1 else 0.0 for x in xs]
    return xs, means, stds


def _line(ax, xs, means, stds, text, color, dodge: float = 0.0) -> list[float]:
    """One line (mean) with its ±std band or whiskers; returns the band's edges (for the axis limits)."""
    if dodge or len(xs) == 1:  # a band needs two x values; whiskers show the spread of single points
        xs = [x + dodge for x in xs]
        ax.errorbar(xs, means, yerr=stds if any(stds) else None, marker="o", markersize=5, capsize=4,
                    color=color, label=text)
    else:
        ax.plot(xs, means, marker="o", markersize=4, color=color, label=text)
    if any(stds) and len(xs) > 1:
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=color, alpha=0.2, linewidth=0)
    return [m - s for m, s in zip(means, stds)] + [m + s for m, s in zip(means, stds)]


def _n_text(groups: list[Group]) -> str:
    ns = sorted({len(g.finished) for g in groups})
    return f"{ns[0]} seed{'s' if ns[0] != 1 else ''}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} seeds"


def _limits(values: list, metric: str, min_span: float = 0.3) -> tuple[float, float]:
    """An axis from just below the lowest of data and baseline to just above the highest, on 0.1 steps,
    at least ``min_span`` wide: a difference of a few examples stays a small step, not a cliff."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    floor, ceil = (0.0, 1.0) if metric in ZERO_ONE else (-1.0, 1.0) if metric in BOUNDED else (None, None)
    if not vals:
        return (floor if floor is not None else 0.0), (ceil if ceil is not None else 1.0)
    lo = math.floor((min(vals) - 0.05) * 10) / 10
    hi = math.ceil((max(vals) + 0.05) * 10) / 10
    while hi - lo < min_span - 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    if floor is None:  # unbounded (a generative run's perplexity): a margin, so no point or baseline sits on the frame
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    if floor is not None:
        lo, hi = max(lo, floor), min(hi, ceil)
        if hi - lo < min_span:
            lo, hi = (max(floor, hi - min_span), hi) if hi >= ceil else (lo, min(ceil, lo + min_span))
    return lo, hi


def _baseline_value(baselines: Optional[list], metric: str) -> list[tuple[str, float, str]]:
    out = []
    for b in baselines or []:
        v = b.get(f"{metric}_mean")
        if v is not None:
            what = "" if b.get("kind") == "base_model" else "trivial baseline: "  # a generative run's: the base model
            out.append((f"{what}{b['name']} ({v:.3f})", v, b["name"]))
    return out


def _baseline_lines(ax, baselines: Optional[list], metric: str) -> list[float]:
    """The trivial baselines as dashed horizontal lines; returns their values."""
    refs = _baseline_value(baselines, metric)
    for text, v, _ in refs:
        ax.axhline(v, color="black", linestyle="--", linewidth=1.2, label=text, zorder=1)
    return [v for _, v, _ in refs]


def _titles(fig, ax, title: str, col: Collection, note: str = "") -> None:
    from .report import context_line
    ax.set_title(context_line(col) + (f"\n{note}" if note else ""), fontsize="small", color="dimgray")
    fig.suptitle(title, fontsize="medium", fontweight="bold")


def eval_per_epoch(col: Collection, metric: str, path: Path, baselines: Optional[list] = None) -> Optional[Path]:
    """The metric at each evaluation (end of each epoch, or --max_steps) against optimizer steps."""
    groups = [g for g in col.groups if g.finished]
    if not groups:
        return None
    splits = sorted({r.metrics.get("eval_split", "validation") for g in groups for r in g.finished})
    fig, ax, colors = _figure(len(groups))
    steps: set = set()
    values: list = []
    series_of = {}
    for g in groups:
        series = [{e["step"]: e[metric] for e in r.metrics.get("epochs", []) if metric in e} for r in g.finished]
        series_of[g.key] = [s for s in series if s]
        for s in series_of[g.key]:
            steps.update(s)
    top = max(steps) if steps else 1
    for i, g in enumerate(groups):
        if series_of[g.key]:
            # Configurations often score alike: a small sideways shift keeps every one visible.
            dodge = 0.012 * top * (i - (len(groups) - 1) / 2) if len(groups) > 1 else 0.0
            values += _line(ax, *_aggregate(series_of[g.key]), label(g, col.swept), colors(i % colors.N), dodge)
    values += _baseline_lines(ax, baselines, metric)
    if steps:
        ax.set_xlim(0, top * 1.08)
    ax.set_ylim(*_limits(values, metric))
    _titles(fig, ax, f"{'/'.join(splits).capitalize()} {metric} at each evaluation "
                     f"(mean ± std over {_n_text(groups)})", col)
    return _finish_steps(fig, ax, _unit(metric), path)


def step_curves(col: Collection, name: str, curves: list[dict], metric: str, path: Path,
                baselines: Optional[list] = None) -> Optional[Path]:
    """``metric`` against optimizer step for one swept field: a line per value (report.step_curves), the
    mean over its runs with a ±1 std band where it has several, and the trivial baseline."""
    if not curves:
        return None
    fig, ax, colors = _figure(len(curves))
    values: list = []
    for i, c in enumerate(curves):
        n = c["n_series"]
        values += _line(ax, c["steps"], c["mean"], [s or 0.0 for s in c["std"]],
                        f"{c['label']} ({n} run{'s' if n != 1 else ''})", colors(i % colors.N))
    values += _baseline_lines(ax, baselines, metric)
    top = max((x for c in curves for x in c["steps"]), default=1)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(*_limits(values, metric))
    splits = sorted({r.metrics.get("eval_split", "validation") for g in col.groups for r in g.finished})
    every = sorted({int(r.config.get("eval_every") or 0) for g in col.groups for r in g.finished} - {0})
    others = sorted({k for c in curves for k in c["averaged_over"]})
    note = (f"evaluated every {'/'.join(map(str, every))} steps and at epoch ends; " if every else "") + \
        "line: mean over seeds" + (f" and over the values of {', '.join(others)}" if others else "") + \
        ", band: ± 1 std (sample)"
    _titles(fig, ax, f"{'/'.join(splits).capitalize()} {metric} against optimizer step, by {name}", col, note)
    return _finish_steps(fig, ax, _unit(metric), path, name)


def loss_curves(col: Collection, path: Path, baselines: Optional[list] = None) -> Optional[Path]:
    groups = [g for g in col.groups if any(r.train_log for r in g.finished)]
    if not groups:
        return None
    fig, ax, colors = _figure(len(groups))
    regression = any(r.resolved.get("num_labels") == 1 for g in groups for r in g.finished)
    for i, g in enumerate(groups):
        series = [{e["step"]: e["loss"] for e in r.train_log if e.get("loss") is not None} for r in g.finished]
        series = [s for s in series if s]
        if series:
            _line(ax, *_aggregate(series), label(g, col.swept), colors(i % colors.N))
    for b in baselines or []:
        if b.get("train_loss") is not None:
            what = "label variance" if b.get("kind") == "training_mean" else "entropy of the training labels"
            ax.axhline(b["train_loss"], color="black", linestyle="--", linewidth=1.2,
                       label=f"constant predictor ({what}): {b['train_loss']:.3f}", zorder=1)
    ax.set_ylim(bottom=0)
    _titles(fig, ax, f"Training loss (mean per logging window; mean ± std over {_n_text(groups)})", col)
    return _finish_steps(fig, ax, "loss (mean squared error)" if regression else "loss (cross-entropy, nats)", path)


def final_bars(col: Collection, rows: list[dict], base: list[dict], metric: str, path: Path,
               baselines: Optional[list] = None) -> Optional[Path]:
    """Horizontal bars from zero (long names stay readable): one per configuration, then the base model's;
    the trivial baseline as a dashed line."""
    bars = [(r["label"], r.get(f"{metric}_mean"), r.get(f"{metric}_std"), False) for r in rows
            if r.get(f"{metric}_mean") is not None]
    bars += [(f"{b['label'].replace(' (un-tuned)', '')}, prompt={b['eval_prompt']} ({b['split']})", b.get(f"{metric}_mean"),
              b.get(f"{metric}_std"), True) for b in base if b.get(f"{metric}_mean") is not None]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(9, 2.2 + 0.45 * len(bars)), layout="constrained")
    ys = list(range(len(bars)))[::-1]
    for y, (text, mean, std, is_base) in zip(ys, bars):
        ax.barh(y, mean, xerr=std if std else None, color="lightgray" if is_base else "tab:blue",
                hatch="//" if is_base else None, edgecolor="gray", capsize=4, height=0.7)
        ax.text(mean + (std or 0) + 0.01, y, f"{mean:.3f}" + (f" ± {std:.3f}" if std else ""), va="center",
                fontsize="small", clip_on=False, zorder=4, bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.8))
    refs = _baseline_value(baselines, metric)
    for text, v, _ in refs:
        ax.axvline(v, color="black", linestyle="--", linewidth=1.4, label=text, zorder=3)
    ax.set_yticks(ys, [b[0] for b in bars], fontsize="small")
    lows = [m - (s or 0) for _, m, s, _ in bars]
    highs = [m + (s or 0) for _, m, s, _ in bars] + [v for _, v, _ in refs]
    bounded = metric in ZERO_ONE or metric in BOUNDED
    left = min(0.0, min(lows)) if not bounded or min(lows) >= 0 else max(-1.0, math.floor(min(lows) * 10) / 10)
    right = 1.0 if bounded and max(highs) <= 1.0 else max(highs) * 1.05
    ax.set_xlim(left, right)
    splits = sorted({r.get("eval_split") for r in rows if r.get("eval_split")})
    examples = sorted({r.get("eval_examples") for r in rows if r.get("eval_examples")})
    ax.set_xlabel(f"{metric} ({'/'.join(map(str, splits)) or 'eval split'}"
                  f"{', ' + '/'.join(map(str, examples)) + ' examples' if examples else ''})")
    _titles(fig, ax, f"Final {metric} per configuration", col,
            "bar: mean, whiskers: ± std over seeds; hatched: the un-tuned base model")
    ax.grid(axis="x", alpha=0.3)
    if refs:
        fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    return _save(fig, path)


def prompt_matrix(rows: list[dict], base: list[dict], metric: str, path: Path, baselines: Optional[list] = None,
                  col: Optional[Collection] = None) -> Optional[Path]:
    """Heat map: each trained configuration (and the base model) evaluated under each prompt; colours are
    centred on the trivial baseline (white), red below it, blue above."""
    prompts = list(dict.fromkeys(e["eval_prompt"] for r in rows for e in r["eval_rows"] if e["adapter"] == "adapter"))
    if not prompts:
        return None
    table = [(r["label"], {e["eval_prompt"]: e for e in r["eval_rows"] if e["adapter"] == "adapter"}) for r in rows]
    for name in dict.fromkeys(b["label"] for b in base):  # one row per way of scoring the base (head, label words)
        table.append((name, {b["eval_prompt"]: b for b in base if b["label"] == name}))
    ref = _baseline_value(baselines, metric)
    if ref:
        table.append((f"trivial baseline ({ref[0][2]})",
                      {p: {f"{metric}_mean": ref[0][1]} for p in prompts}))
    import numpy as np
    from matplotlib.colors import Normalize, TwoSlopeNorm
    grid = np.array([[cells[p].get(f"{metric}_mean") if p in cells else None for p in prompts] for _, cells in table],
                    dtype=float)  # None: NaN
    finite = np.isfinite(grid).any()
    vmin, vmax = (float(np.nanmin(grid)), float(np.nanmax(grid))) if finite else (0.0, 1.0)
    if ref:
        center = ref[0][1]
        spread = max(abs(vmax - center), abs(center - vmin), 0.05)
        lo, hi = center - spread, center + spread
        if metric in ZERO_ONE or metric in BOUNDED:  # the colour bar does not run past what the metric can reach
            lo, hi = max(lo, 0.0 if metric in ZERO_ONE else -1.0), min(hi, 1.0)
        norm = TwoSlopeNorm(vcenter=center, vmin=min(lo, center - 1e-6), vmax=max(hi, center + 1e-6))
        cmap = "RdBu"
    else:
        norm, cmap = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9), "viridis"
    fig, ax = plt.subplots(figsize=(2.6 + 1.5 * len(prompts), 1.8 + 0.55 * len(table)), layout="constrained")
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
    for i, (_, cells) in enumerate(table):
        for j, p in enumerate(prompts):
            if p in cells and cells[p].get(f"{metric}_mean") is not None:
                std = cells[p].get(f"{metric}_std")
                v = cells[p][f"{metric}_mean"]
                strong = abs(float(norm(v)) - 0.5) > 0.3 if ref else float(norm(v)) < 0.5
                ax.text(j, i, f"{v:.3f}" + (f"\n± {std:.3f}" if std else ""), ha="center", va="center",
                        fontsize="small", color="white" if strong else "black")
    ax.set_xticks(range(len(prompts)), prompts)
    ax.set_yticks(range(len(table)), [t[0] for t in table], fontsize="small")
    ax.set_xlabel("prompt used for evaluation")
    ax.set_ylabel("trained configuration")
    title = f"{metric.capitalize()} of each adapter under each prompt (mean over seeds; blank: not evaluated)"
    if col is not None:
        _titles(fig, ax, title, col)
    else:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label=_unit(metric) + (" (white: trivial baseline)" if ref else ""))
    return _save(fig, path)
