"""Figures (PNG, Agg, fixed size and dpi, no software/date metadata: same data, same bytes)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pcbench.report import fmt  # noqa: E402
from pcbench.report.load import Study  # noqa: E402
from pcbench.report.tables import aggregate, attach_paper, pair_stages, stage_runs  # noqa: E402

DPI = 100
STYLE = {"hpr": dict(linestyle="--", marker="s"), "pc": dict(linestyle="-", marker="o")}


def save(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` atomically (temp file, then rename) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _panels(n: int, width: float = 4.2, height: float = 3.4) -> tuple[plt.Figure, list]:
    cols = min(max(n, 1), 3)
    rows = (max(n, 1) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:max(n, 1)]


def _colors(values: list) -> dict:
    cmap = plt.get_cmap("viridis")
    return {v: cmap(i / max(len(values) - 1, 1) * 0.85) for i, v in enumerate(values)}


def _title(keys: list[str], combo: tuple) -> str:
    return ", ".join(f"{k} {fmt.value(k, v)}" for k, v in zip(keys, combo)) or "all runs"


def _groups(df: pd.DataFrame, keys: list[str]):
    if not keys:
        yield (), df
        return
    for combo, sub in df.groupby(keys, dropna=False, sort=True):
        yield (combo if isinstance(combo, tuple) else (combo,)), sub


def _tokens_axis(ax, xlabel: str = "retraining tokens") -> None:
    ax.set_xscale("log")
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
    for ax, (combo, sub) in zip(axes, groups):
        for (c, m), s in sub.groupby(["compression", "method"], sort=True):
            s = s.sort_values("tokens")
            ax.errorbar(s.tokens, s["mean"], yerr=s["std"].fillna(0), color=colors[c], capsize=2, markersize=4,
                        label=f"{fmt.value('method', m)} {fmt.value('compression', c)}", **STYLE.get(m, {}))
            if "paper_loss" in s and s.paper_loss.notna().any():
                ax.plot(s.tokens, s.paper_loss, linestyle="none", marker="x", color=colors[c], alpha=0.6)
        ax.set_title(_title(base, combo), fontsize=9)
        _tokens_axis(ax)
        ax.set_ylabel("train loss (last 100 steps)")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Loss vs retraining tokens (stage {stage}; dashed HPR, solid PC; x: paper)", fontsize=10)
    fig.tight_layout()
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
    for ax, (stage, base, combo, sub) in zip(axes, panels):
        levels = sorted(sub.compression.dropna().unique())
        colors = _colors(levels)
        for c, s in sub.groupby("compression", sort=True):
            s = s.sort_values("tokens")
            ax.errorbar(s.tokens, s.gap, yerr=s.gap_sd.fillna(0), color=colors[c], marker="o", capsize=2,
                        markersize=4, label=fmt.value("compression", c))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{stage}: {_title(base, combo)}", fontsize=9)
        _tokens_axis(ax)
        ax.set_ylabel("loss(PC) - loss(HPR)")
        ax.legend(fontsize=7)
    fig.suptitle("PC - HPR gap vs retraining tokens (below 0: PC better; bars: ± s.d. over seeds)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def gap_vs_ratio(cells: pd.DataFrame, path: Path) -> Optional[Path]:
    """gap vs the base's tokens-per-parameter ratio, a panel per level, a line per token budget."""
    if cells.empty or cells.base_ratio.dropna().nunique() < 2:
        return None
    levels = sorted(cells.compression.dropna().unique())
    fig, axes = _panels(len(levels))
    for ax, c in zip(axes, levels):
        sub = cells[cells.compression == c]
        toks = sorted(sub.tokens.unique())
        colors = _colors(toks)
        rest = [k for k in sub.columns if k in ("model",)]
        for combo, s in sub.groupby(["stage", "tokens", *rest], sort=True):
            if s.base_ratio.nunique() < 2:
                continue
            s = s.groupby("base_ratio", sort=True).agg(gap=("gap", "mean"), sd=("gap_sd", "mean")).reset_index()
            ax.errorbar(s.base_ratio, s.gap, yerr=s.sd.fillna(0), color=colors[combo[1]], marker="o", capsize=2,
                        markersize=4, label=" ".join([fmt.tokens(combo[1]), *[str(x) for x in combo[2:]]]))
        ax.axhline(0, color="black", linewidth=0.8)
        ratios = sorted(cells.base_ratio.dropna().unique())
        ax.set_xticks(ratios, [fmt.value("ratio", r) for r in ratios])
        ax.set_xlabel("base tokens per parameter")
        ax.set_ylabel("loss(PC) - loss(HPR)")
        ax.set_title(fmt.value("compression", c), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, title="tokens", title_fontsize=7)
    fig.suptitle("PC - HPR gap vs base tokens-per-parameter ratio (bars: ± s.d. over seeds)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def downstream(study: Study, path: Path) -> Optional[Path]:
    """The poster's Figure 2: eval average vs tokens, PC vs HPR."""
    ev = study.evals
    if ev.empty:
        return None
    ev = ev[ev.method.isin(["hpr", "pc"])]
    keys = [k for k in ["parent_stage", *study.labels] if k in ev.columns and k not in
            ("method", "seed", "tokens", "compression") and ev[k].notna().any()]
    groups = list(_groups(ev, keys))
    fig, axes = _panels(len(groups))
    for ax, (combo, sub) in zip(axes, groups):
        levels = sorted(sub.compression.dropna().unique())
        colors = _colors(levels)
        agg = sub.groupby(["compression", "method", "tokens"], sort=True).average.agg(["mean", "std"]).reset_index()
        for (c, m), s in agg.groupby(["compression", "method"], sort=True):
            ax.errorbar(s.tokens, s["mean"], yerr=s["std"].fillna(0), color=colors[c], capsize=2, markersize=4,
                        label=f"{fmt.value('method', m)} {fmt.value('compression', c)}", **STYLE.get(m, {}))
        ax.set_title(_title(keys, combo), fontsize=9)
        _tokens_axis(ax)
        ax.set_ylabel("downstream average (higher is better)")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Downstream average vs retraining tokens (dashed HPR, solid PC)", fontsize=10)
    fig.tight_layout()
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
    for ax, kind in zip(axes, axes_kinds):
        for r in pick.sort_values(["stage", "base_ratio", "compression"]).itertuples():
            s = rec[rec.run == r.id].sort_values("step")
            if s.empty:
                continue
            ax.plot(s.step, s[f"recovery/{kind}/mean"] * 100, color=colors.get(r.compression, "gray"),
                    linestyle=dashes.get(r.base_ratio, "-"),
                    label=f"{r.stage} {fmt.value('ratio', r.base_ratio)} {fmt.value('compression', r.compression)} "
                          f"{fmt.tokens(r.tokens)}")
        ax.set_title(f"{kind}", fontsize=9)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("% of P mass on pruned dimensions")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("PC recovery: projection mass moved onto dimensions hard pruning dropped", fontsize=10)
    fig.tight_layout()
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
            panels.append((f"{stage}: {_title(base, combo)}, {fmt.value('compression', mid)}", sub))
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
            ax.plot(s.tokens, y, label=f"{fmt.value('method', r.method)} (seed {r.seed})",
                    linestyle=STYLE.get(r.method, {}).get("linestyle", "-"))
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("tokens")
        ax.set_ylabel("train loss (running mean)")
        ax.grid(True, alpha=0.3)
        lo = np.nanpercentile(m.loss_avg if "loss_avg" in m else m.loss, 1)
        hi = np.nanpercentile(m.loss_avg if "loss_avg" in m else m.loss, 85)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
        ax.legend(fontsize=7)
    fig.suptitle("Training curves (largest budget, middle compression level)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
