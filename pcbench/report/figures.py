"""Figures (PNG, Agg, fixed size and dpi, no software/date metadata: same data, same bytes).

Token axes are log-scaled with one tick per budget run, labelled like the tables (400k, 1.6M);
titles and legends name labels in words (`fmt.phrase`); a suptitle names only what is drawn.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from pcbench.spec import methods  # noqa: E402
from pcbench.util.atomic import write_png  # noqa: E402
from pcbench.report import fmt  # noqa: E402
from pcbench.report.load import Study  # noqa: E402
from pcbench.report.tables import (aggregate, attach_paper, eval_frame, pair_stages,  # noqa: E402
                                   stage_runs)

DPI = 100
STYLE = {n: dict(m.style) for n, m in methods.METHODS.items() if m.style}  # the registry's plot styles
METHOD_COLOR = {n: m.color for n, m in methods.METHODS.items() if m.color}


MIN_TICK_GAP = 0.11  # token ticks closer than this share of the axis width are thinned out
DODGE = 0.012        # decades between neighbouring series at one budget (downstream: bars overlap)


def save(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` atomically (`atomic.write_png`, no software metadata) and close it."""
    try:
        return write_png(path, fig, dpi=DPI, metadata={"Software": None})
    finally:
        plt.close(fig)


def _wrap(text: str, inches: float, fontsize: float) -> str:
    """`text` wrapped to fit `inches` at `fontsize` (DejaVu Sans: ~0.55 em per character)."""
    return textwrap.fill(text, max(int(inches * 72 / (0.55 * fontsize)), 20))


def _suptitle(fig: plt.Figure, text: str) -> None:
    """A suptitle wrapped to the figure's width (never cut off at the edges)."""
    fig.suptitle(_wrap(text, fig.get_figwidth() * 0.95, 10), fontsize=10)


def _ax_title(ax, text: str, fontsize: float = 9) -> None:
    """A panel title wrapped to the panel's width."""
    ax.set_title(_wrap(text, ax.get_figure().get_figwidth() * ax.get_position().width, fontsize), fontsize=fontsize)


def _panels(n: int, width: float = 4.2, height: float = 3.2) -> tuple[plt.Figure, list]:
    """A grid of n panels (3 a row), laid out by constrained layout (room for titles and a figure legend)."""
    cols = min(max(n, 1), 3)
    rows = (max(n, 1) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 6.0), height * rows), squeeze=False,
                             layout="constrained")
    axes = list(axes.ravel())
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:max(n, 1)]


def _legend(fig: plt.Figure, axes: list, title: Optional[str] = None, ncol: int = 4) -> None:
    """One legend for the whole figure, below the panels (never over the data): each label once."""
    handles: dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize=7,
                   ncol=min(len(handles), ncol), title=title, title_fontsize=7)


def _colors(values: list) -> dict:
    cmap = plt.get_cmap("viridis")
    return {v: cmap(i / max(len(values) - 1, 1) * 0.85) for i, v in enumerate(values)}


def _title(keys: list[str], combo: tuple, stage: Optional[str] = None) -> str:
    """A panel title in words: "stage importance: activation importance, 80:1 base"."""
    words = fmt.phrases(keys, combo)
    if stage is not None:
        return f"{fmt.phrase('stage', stage)}: {words}" if words else fmt.phrase("stage", stage)
    return words  # no keys: a single panel, which the suptitle describes


def _groups(df: pd.DataFrame, keys: list[str]):
    if not keys:
        yield (), df
        return
    for combo, sub in df.groupby(keys, dropna=False, sort=True):
        yield (combo if isinstance(combo, tuple) else (combo,)), sub


def token_ticks(budgets, min_gap: float = MIN_TICK_GAP) -> tuple[list[float], tuple[float, float]]:
    """Ticks for a log token axis showing `budgets`: every budget, thinned so neighbours are at least
    `min_gap` of the axis apart (the largest always kept), and x-limits with a margin on each side."""
    b = sorted({float(x) for x in budgets if not fmt.is_nan(x) and float(x) > 0})
    if not b:
        return [], (1.0, 10.0)
    lo, hi = math.log10(b[0]), math.log10(b[-1])
    pad = max((hi - lo) * 0.08, 0.15)
    lo, hi = lo - pad, hi + pad
    ticks: list[float] = []
    for x in reversed(b):
        if not ticks or (math.log10(ticks[-1]) - math.log10(x)) / (hi - lo) >= min_gap:
            ticks.append(x)
    return sorted(ticks), (10 ** lo, 10 ** hi)


def _tokens_axis(ax, budgets, xlabel: str = "retraining tokens") -> None:
    """Log x-axis with a tick at each budget, labelled as in the tables (no minor-tick labels)."""
    ticks, lim = token_ticks(budgets)
    ax.set_xscale("log")
    ax.set_xlim(*lim)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt.tokens(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)


def loss_vs_tokens(study: Study, stage: str, path: Path) -> Optional[Path]:
    """Figure 2 of the paper: loss vs retraining tokens, PC vs HPR, a panel per base, a colour per level."""
    df, keys = stage_runs(study, stage)
    df = attach_paper(df, study.grid)
    long = aggregate(df, keys)
    if long.empty or long.tokens.nunique() < 2:
        return None
    base = [k for k in keys if k != "compression"]
    groups = list(_groups(long, base))
    levels = sorted(long.compression.dropna().unique())
    colors = _colors(levels)
    fig, axes = _panels(len(groups))
    paper = False
    for ax, (combo, sub) in zip(axes, groups):
        for (c, m), s in sub.groupby(["compression", "method"], sort=True):
            s = s.sort_values("tokens")
            ax.errorbar(s.tokens, s["mean"], yerr=s["std"].fillna(0), color=colors[c], capsize=2, markersize=4,
                        label=f"{fmt.value('method', m)} {fmt.value('compression', c)}", **STYLE.get(m, {}))
            if "paper_loss" in s and s.paper_loss.notna().any():
                ax.plot(s.tokens, s.paper_loss, linestyle="none", marker="x", color=colors[c], alpha=0.6)
                paper = True
        _ax_title(ax, _title(base, combo))
        _tokens_axis(ax, long.tokens)
        ax.set_ylabel("train loss (last 100 steps)")
    _legend(fig, axes, ncol=6)
    bars = "; bars: ±\u00a0s.d. over seeds" if (long.n > 1).any() else ""
    _suptitle(fig, f"Loss vs retraining tokens ({fmt.phrase('stage', stage)}; dashed HPR, solid PC"
                   f"{'; x: the paper' if paper else ''}{bars})")
    return save(fig, path)


def gap_vs_tokens(cells: pd.DataFrame, keys_by: dict[str, list[str]], path: Path) -> Optional[Path]:
    """gap = loss(PC) - loss(HPR) vs tokens, a panel per (stage, base), a line per level (± s.d. over seeds)."""
    panels = []
    for stage, keys in sorted(keys_by.items()):
        c = cells[cells.stage == stage] if len(cells) else cells
        if c.empty or c.tokens.nunique() < 2:
            continue
        base = [k for k in keys if k != "compression"]
        panels += [(stage, base, combo, sub) for combo, sub in _groups(c, base)]
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    colors = _colors(sorted(cells.compression.dropna().unique()))
    for ax, (stage, base, combo, sub) in zip(axes, panels):
        for c, s in sub.groupby("compression", sort=True):
            s = s.sort_values("tokens")
            ax.errorbar(s.tokens, s.gap, yerr=s.gap_sd.fillna(0), color=colors[c], marker="o", capsize=2,
                        markersize=4, label=fmt.phrase("compression", c))
        ax.axhline(0, color="black", linewidth=0.8)
        _ax_title(ax, _title(base, combo, stage))
        _tokens_axis(ax, sub.tokens)
        ax.set_ylabel("loss(PC) - loss(HPR)")
    _legend(fig, axes)
    bars = "; bars: ±\u00a0s.d. of the per-seed gaps" if cells.gap_sd.notna().any() else ""
    _suptitle(fig, f"PC - HPR gap vs retraining tokens (below 0: PC better{bars})")
    return save(fig, path)


def gap_vs_ratio(cells: pd.DataFrame, path: Path) -> Optional[Path]:
    """gap vs the base's tokens-per-parameter ratio, a panel per level, a line per token budget."""
    if cells.empty or cells.base_ratio.dropna().nunique() < 2:
        return None
    levels = sorted(cells.compression.dropna().unique())
    fig, axes = _panels(len(levels))
    colors = _colors(sorted(cells.tokens.unique()))
    for ax, c in zip(axes, levels):
        sub = cells[cells.compression == c]
        rest = [k for k in sub.columns if k in ("model",)]
        lines = [(combo, s) for combo, s in sub.groupby(["stage", "tokens", *rest], sort=True)
                 if s.base_ratio.nunique() >= 2]
        multi = len({combo[0] for combo, _ in lines}) > 1
        for combo, s in lines:
            s = s.groupby("base_ratio", sort=True).agg(gap=("gap", "mean"), sd=("gap_sd", "mean")).reset_index()
            ax.errorbar(s.base_ratio, s.gap, yerr=s.sd.fillna(0), color=colors[combo[1]], marker="o", capsize=2,
                        markersize=4, label=", ".join([fmt.tokens(combo[1]), *[str(x) for x in combo[2:]]] +
                                                      ([fmt.phrase("stage", combo[0])] if multi else [])))
        ax.axhline(0, color="black", linewidth=0.8)
        ratios = sorted(cells.base_ratio.dropna().unique())
        ax.set_xticks(ratios, [fmt.value("ratio", r) for r in ratios])
        ax.set_xlabel("base tokens per parameter")
        ax.set_ylabel("loss(PC) - loss(HPR)")
        _ax_title(ax, fmt.phrase("compression", c))
        ax.grid(True, alpha=0.3)
    _legend(fig, axes, title="retraining tokens", ncol=6)
    bars = " (bars: ±\u00a0s.d. of the per-seed gaps)" if cells.gap_sd.notna().any() else ""
    _suptitle(fig, f"PC - HPR gap vs the base's tokens-per-parameter ratio{bars}")
    return save(fig, path)


def downstream(study: Study, path: Path) -> Optional[Path]:
    """The poster's Figure 2: eval average vs tokens, PC vs HPR (± s.e.), the tasks' chance level dotted."""
    ev = eval_frame(study)
    if ev.empty:
        return None
    keys = [k for k in ["parent_stage", *study.labels] if k in ev.columns and k not in
            ("method", "seed", "tokens", "compression") and ev[k].notna().any()]
    fixed = [k for k in keys if ev[k].nunique(dropna=False) == 1]  # the same in every panel: said once
    keys = [k for k in keys if k not in fixed]
    groups = list(_groups(ev, keys))
    fig, axes = _panels(len(groups))
    colors = _colors(sorted(ev.compression.dropna().unique()))
    for ax, (combo, sub) in zip(axes, groups):
        agg = aggregate(sub, ["compression"], value="average", lower_is_better=False, se="average_se")
        series = list(agg.groupby(["compression", "method"], sort=True))
        for i, ((c, m), s) in enumerate(series):
            s = s.sort_values("tokens")
            dodge = 10 ** ((i - (len(series) - 1) / 2) * DODGE)  # overlapping error bars drawn side by side
            ax.errorbar(s.tokens * dodge, s["mean"], yerr=s["se"].fillna(0), color=colors[c], capsize=2,
                        markersize=4, label=f"{fmt.value('method', m)} {fmt.value('compression', c)}",
                        **STYLE.get(m, {}))
        for level in sorted(sub.chance.dropna().unique()):
            ax.axhline(level, color="gray", linestyle=":", linewidth=1.2, label=f"chance ({fmt.num(level, 3)})")
        _ax_title(ax, _title(keys, combo))
        _tokens_axis(ax, ev.tokens)
        ax.set_ylabel("average score (higher is better)")
    _legend(fig, axes, ncol=7)
    where = fmt.phrases(fixed, [ev[k].iloc[0] for k in fixed])
    _suptitle(fig, f"Downstream average vs retraining tokens ({where + '; ' if where else ''}dashed HPR, solid PC; "
                   "bars: ±\u00a0s.e.; dotted: chance)")
    return save(fig, path)


def recovery(study: Study, path: Path) -> Optional[Path]:
    """Mean share of projection mass on pruned dimensions vs step; one line per (base, level), largest budget."""
    t = study.train
    pc = t[t.method == "pc"] if len(t) else t
    if pc.empty:
        return None
    # the stages that vary level or budget (a sweep or an ablation would crowd the panels)
    main = [s for s, d in pc.groupby("stage", sort=True) if s in pair_stages(study) and
            (d.compression.nunique() > 1 or d.tokens.nunique() > 1)]
    pc = pc[pc.stage.isin(main)] if main else pc
    pick = pc.sort_values(["tokens", "seed", "id"], ascending=[False, True, True]) \
        .groupby(["stage", "base_ratio", "compression"], dropna=False, sort=True).head(1)
    rec = study.recovery(list(pick.id))
    if rec.empty:
        return None
    axes_kinds = sorted(c.split("/")[1] for c in rec.columns if c.startswith("recovery/") and c.endswith("/mean"))
    fig, axes = _panels(len(axes_kinds))
    levels = sorted(pick.compression.dropna().unique())
    colors = _colors(levels)
    ratios = sorted(pick.base_ratio.dropna().unique())
    dashes = {r: ["-", "--", ":", "-."][i % 4] for i, r in enumerate(ratios)}
    multi = pick.stage.nunique() > 1
    for ax, kind in zip(axes, axes_kinds):
        for r in pick.sort_values(["stage", "base_ratio", "compression"]).itertuples():
            s = rec[rec.run == r.id].sort_values("step")
            if s.empty:
                continue
            ax.plot(s.step, s[f"recovery/{kind}/mean"] * 100, color=colors.get(r.compression, "gray"),
                    linestyle=dashes.get(r.base_ratio, "-"),
                    label=", ".join(([fmt.phrase("stage", r.stage)] if multi else []) +
                                    [fmt.phrases(["ratio", "compression", "tokens"],
                                                 [r.base_ratio, r.compression, r.tokens])]))
        _ax_title(ax, f"{kind} projections")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("% of P mass on pruned dimensions")
        ax.grid(True, alpha=0.3)
    _legend(fig, axes, ncol=3)
    _suptitle(fig, "PC recovery: projection mass moved onto dimensions hard pruning dropped (largest budget)")
    return save(fig, path)


def curves(study: Study, path: Path) -> Optional[Path]:
    """Training curves (loss_avg vs tokens) of HPR and PC for the largest budget at the middle level, per base."""
    panels = []
    for stage in pair_stages(study):
        df, keys = stage_runs(study, stage)
        if df.empty:
            continue
        levels = sorted(df.compression.dropna().unique())
        mid = levels[len(levels) // 2] if levels else None
        df = df[(df.compression == mid) & (df.tokens == df.tokens.max())]
        base = [k for k in keys if k != "compression"]
        for combo, sub in _groups(df, base):
            sub = sub.sort_values(["seed", "id"]).groupby("method", sort=True).head(1)
            panels.append((_title(base + ["compression"], (*combo, mid), stage), sub))
    panels = panels[:6]
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    for ax, (title, sub) in zip(axes, panels):
        m = study.curves(list(sub.id))
        if m.empty:
            continue
        for r in sub.sort_values("method").itertuples():
            s = m[m.run == r.id].sort_values("step")
            y = s.loss_avg if "loss_avg" in s else s.loss
            ax.plot(s.tokens, y, label=f"{fmt.value('method', r.method)} ({fmt.phrase('seed', r.seed)})",
                    linestyle=STYLE.get(r.method, {}).get("linestyle", "-"), color=METHOD_COLOR.get(r.method))
        _ax_title(ax, title, fontsize=8)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt.tokens(x)))
        ax.set_xlabel("retraining tokens")
        ax.set_ylabel("train loss (running mean)")
        ax.grid(True, alpha=0.3)
        lo = np.nanpercentile(m.loss_avg if "loss_avg" in m else m.loss, 1)
        hi = np.nanpercentile(m.loss_avg if "loss_avg" in m else m.loss, 85)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    _legend(fig, axes)
    _suptitle(fig, "Training curves (largest budget, middle compression level; dashed HPR, solid PC)")
    return save(fig, path)
