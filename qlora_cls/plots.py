"""The report's figures (matplotlib, no display needed): evaluation per epoch, training loss, final bars.

Each figure is titled, has labelled axes with units and a legend outside the plotting area (long
configuration names never cover the data); lines are the mean over seeds, bands +-1 std.
"""
from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from .report import Collection, Group, label  # noqa: E402

DPI = 120
BOUNDED = {"accuracy", "f1", "matthews_correlation", "pearson", "spearmanr"}


def _unit(metric: str) -> str:
    return f"{metric} (0-1)" if metric in {"accuracy", "f1"} else (
        f"{metric} (-1 to 1)" if metric in BOUNDED else metric)


def _save(fig, path: Path) -> Path:
    from .files import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _legend(ax) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize="small",
                  title="configuration", title_fontsize="small")


def _aggregate(series: list[dict[float, float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over runs at the x values every run has (resumed or cut runs may miss some)."""
    xs = sorted(set.intersection(*(set(s) for s in series))) if series else []
    means = [statistics.fmean(s[x] for s in series) for x in xs]
    stds = [statistics.stdev(s[x] for s in series) if len(series) > 1 else 0.0 for x in xs]
    return xs, means, stds


def _line(ax, xs, means, stds, text, color, dodge: float = 0.0) -> None:
    if dodge or len(xs) == 1:  # a band needs two x values; whiskers show the spread of single points
        xs = [x + dodge for x in xs]
        ax.errorbar(xs, means, yerr=stds if any(stds) else None, marker="o", markersize=5, capsize=4,
                    color=color, label=text)
    else:
        ax.plot(xs, means, marker="o", markersize=4, color=color, label=text)
    if any(stds) and len(xs) > 1:
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=color, alpha=0.2, linewidth=0)


def _n_text(groups: list[Group]) -> str:
    ns = sorted({len(g.finished) for g in groups})
    return f"{ns[0]} seed{'s' if ns[0] != 1 else ''}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} seeds"


def eval_per_epoch(col: Collection, metric: str, path: Path) -> Optional[Path]:
    groups = [g for g in col.groups if g.finished]
    if not groups:
        return None
    splits = sorted({r.metrics.get("eval_split", "validation") for g in groups for r in g.finished})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    epochs: set = set()
    for i, g in enumerate(groups):
        series = [{e["epoch"] + 1: e[metric] for e in r.metrics.get("epochs", []) if metric in e} for r in g.finished]
        series = [s for s in series if s]
        if series:
            # Configurations often score alike: a small sideways shift keeps every one visible.
            dodge = 0.06 * (i - (len(groups) - 1) / 2) if len(groups) > 1 else 0.0
            xs, means, stds = _aggregate(series)
            epochs.update(xs)
            _line(ax, xs, means, stds, label(g, col.swept), colors(i % colors.N), dodge)
    if epochs:
        ax.set_xticks(sorted(epochs))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.set_title(f"{'/'.join(splits).capitalize()} {metric} after each epoch (mean ± std over {_n_text(groups)})")
    ax.set_xlabel("epoch (1 = first; evaluated at its end, or at --max_steps; points shifted sideways to stay visible)")
    ax.set_ylabel(_unit(metric))
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def loss_curves(col: Collection, path: Path) -> Optional[Path]:
    groups = [g for g in col.groups if any(r.train_log for r in g.finished)]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    regression = any(r.resolved.get("num_labels") == 1 for g in groups for r in g.finished)
    for i, g in enumerate(groups):
        series = [{e["step"]: e["loss"] for e in r.train_log if e.get("loss") is not None} for r in g.finished]
        series = [s for s in series if s]
        if series:
            _line(ax, *_aggregate(series), label(g, col.swept), colors(i % colors.N))
    ax.set_title(f"Training loss (mean over each logging window; mean ± std over {_n_text(groups)})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean squared error)" if regression else "loss (cross-entropy, nats)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def final_bars(col: Collection, rows: list[dict], base: list[dict], metric: str, path: Path) -> Optional[Path]:
    """Horizontal bars (long names stay readable): one per configuration, then the base model's."""
    bars = [(r["label"], r.get(f"{metric}_mean"), r.get(f"{metric}_std"), False) for r in rows
            if r.get(f"{metric}_mean") is not None]
    bars += [(f"base model, prompt={b['eval_prompt']} ({b['split']})", b.get(f"{metric}_mean"),
              b.get(f"{metric}_std"), True) for b in base if b.get(f"{metric}_mean") is not None]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(bars)))
    ys = list(range(len(bars)))[::-1]
    for y, (text, mean, std, is_base) in zip(ys, bars):
        ax.barh(y, mean, xerr=std if std else None, color="lightgray" if is_base else "tab:blue",
                hatch="//" if is_base else None, edgecolor="gray", capsize=4, height=0.7)
        ax.text(mean + (std or 0) + 0.01, y, f"{mean:.3f}" + (f" ± {std:.3f}" if std else ""), va="center",
                fontsize="small")
    ax.set_yticks(ys, [b[0] for b in bars], fontsize="small")
    top = max(m + (s or 0) for _, m, s, _ in bars)
    ax.set_xlim(min(0, min(m for _, m, _, _ in bars)), max(1.0, top) * 1.18)
    splits = sorted({r.get("eval_split") for r in rows if r.get("eval_split")})
    ax.set_xlabel(f"{_unit(metric)} on {'/'.join(map(str, splits)) or 'the eval split'}, final adapter")
    ax.set_title(f"Final {metric} per configuration (bars: mean, whiskers: ± std over seeds; hatched: un-tuned base)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def prompt_matrix(rows: list[dict], base: list[dict], metric: str, path: Path) -> Optional[Path]:
    """Heat map: each trained configuration (and the base model) evaluated under each prompt."""
    prompts: list[str] = []
    for r in rows:
        for e in r["eval_rows"]:
            if e["adapter"] == "adapter" and e["eval_prompt"] not in prompts:
                prompts.append(e["eval_prompt"])
    if not prompts:
        return None
    table = [(r["label"], {e["eval_prompt"]: e for e in r["eval_rows"] if e["adapter"] == "adapter"}) for r in rows]
    if base:
        table.append(("base model (un-tuned)", {b["eval_prompt"]: b for b in base}))
    values = [[cells[p].get(f"{metric}_mean") if p in cells else None for p in prompts] for _, cells in table]
    import numpy as np
    grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(prompts), 1.4 + 0.55 * len(table)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0,
                      vmax=np.nanmax(grid) if np.isfinite(grid).any() else 1)
    for i, (_, cells) in enumerate(table):
        for j, p in enumerate(prompts):
            if p in cells and cells[p].get(f"{metric}_mean") is not None:
                std = cells[p].get(f"{metric}_std")
                v = cells[p][f"{metric}_mean"]
                bright = (v - np.nanmin(grid)) > 0.5 * (np.nanmax(grid) - np.nanmin(grid) or 1)
                ax.text(j, i, f"{v:.3f}" + (f"\n± {std:.3f}" if std else ""), ha="center", va="center",
                        fontsize="small", color="black" if bright else "white")
    ax.set_xticks(range(len(prompts)), prompts)
    ax.set_yticks(range(len(table)), [t[0] for t in table], fontsize="small")
    ax.set_xlabel("prompt template used for evaluation")
    ax.set_ylabel("trained configuration")
    ax.set_title(f"{metric.capitalize()} of each adapter under each prompt (mean over seeds; blank: not evaluated)")
    fig.colorbar(image, ax=ax, label=_unit(metric))
    return _save(fig, path)
