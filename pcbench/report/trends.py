"""Scaling trends of the PC-HPR gap and the two claims the report decides.

gap = loss(PC) - loss(HPR) per cell (negative: PC better). Seeds are paired by seed label.
(a) "PC gains more over HPR on the high-ratio base than on the low-ratio one": d = gap(high) - gap(low)
    for cells matched on everything but the base ratio; supported when the 95% CI of mean d is < 0.
(b) "the PC gain grows with retraining tokens": slope of gap on log2(tokens) per cell; supported when
    the 95% CI of the mean slope over cells is < 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pcbench.spec import methods
from pcbench.report import fmt
from pcbench.report.load import Study
from pcbench.report.stats import mean_ci, ols_slope, t975, verdict
from pcbench.report.tables import pair_stages, stage_runs

DECISION = ("supported: the 95% confidence interval lies entirely on the claim's side of zero; not supported: "
            "it lies entirely on the other side; inconclusive: it contains zero (or there is too little data).")


@dataclass
class Verdict:
    claim: str
    verdict: str
    estimate: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    method: str = ""
    lines: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)


def cell_name(row: pd.Series | dict, keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = row[k]
        if fmt.is_nan(v):
            continue
        parts.append(fmt.value(k, v) if k == "compression" else fmt.phrase(k, v))
    return ", ".join(parts)


def gaps(study: Study) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[str]]]:
    """Per (stage, keys, tokens) cell with both methods: hpr/pc means, gap, s.d. of paired per-seed gaps.

    Returns (cells, paired per-seed gaps, keys by stage)."""
    cells, paired, keys_by = [], [], {}
    for stage in pair_stages(study):
        df, keys = stage_runs(study, stage)
        keys_by[stage] = keys
        per = df.groupby(keys + ["tokens", "seed", "method"], dropna=False).loss.mean().unstack("method")
        if not set(methods.COMPARED) <= set(per.columns):
            continue
        per = per.reset_index()
        per["diff"] = per.pc - per.hpr
        attrs = df.groupby(keys + ["tokens"], dropna=False).base_ratio.first()
        for combo, sub in per.groupby(keys + ["tokens"], dropna=False, sort=True):
            h, p, d = sub.hpr.dropna(), sub.pc.dropna(), sub["diff"].dropna()
            if h.empty or p.empty:
                continue
            row = dict(zip(keys + ["tokens"], combo))
            sd = float(d.std(ddof=1)) if len(d) > 1 else math.nan
            cells.append({"stage": stage, **row, "base_ratio": attrs.loc[combo] if combo in attrs.index else math.nan,
                          "cell": cell_name(row, keys), "hpr": float(h.mean()), "pc": float(p.mean()),
                          "n_hpr": len(h), "n_pc": len(p), "gap": float(p.mean() - h.mean()), "gap_sd": sd,
                          "n_pairs": len(d), "gap_se": sd / math.sqrt(len(d)) if len(d) > 1 else math.nan})
            for s, v in zip(sub.seed[sub["diff"].notna()], d):
                paired.append({"stage": stage, **row, "seed": s, "gap": float(v)})
    return pd.DataFrame(cells), pd.DataFrame(paired), keys_by


def token_slopes(cells: pd.DataFrame, paired: pd.DataFrame, keys_by: dict[str, list[str]]) -> pd.DataFrame:
    """Per cell (stage, keys): slope of the gap on log2(tokens) with a 95% CI (per-seed t or OLS residual t)."""
    rows = []
    for stage, keys in sorted(keys_by.items()):
        c = cells[cells.stage == stage] if len(cells) else cells
        if c.empty:
            continue
        for combo, sub in c.groupby(keys, dropna=False, sort=True):
            sub = sub.sort_values("tokens")
            k = sub.tokens.nunique()
            if k < 2:
                continue
            x = np.log2(sub.tokens.to_numpy(float))
            slope, se = ols_slope(x, sub.gap.to_numpy(float))
            combo = combo if isinstance(combo, tuple) else (combo,)
            row = dict(zip(keys, combo))
            p = paired[(paired.stage == stage)] if len(paired) else paired
            for kk, v in row.items():
                p = p[(p[kk] == v) | (p[kk].isna() & fmt.is_nan(v))] if len(p) else p
            seeds = p.pivot_table(index="seed", columns="tokens", values="gap") if len(p) else pd.DataFrame()
            complete = seeds.reindex(columns=sorted(sub.tokens)).dropna() if len(seeds) else seeds
            if len(complete) >= 2:
                xs = np.log2(np.asarray(complete.columns, float))
                per_seed = [ols_slope(xs, r.to_numpy(float))[0] for _, r in complete.iterrows()]
                est, lo, hi, n = mean_ci(per_seed)
                how = f"t-interval over {n} per-seed slopes (df {n - 1})"
            elif k >= 3 and not math.isnan(se):
                est, h = slope, t975(k - 2) * se
                lo, hi, n = slope - h, slope + h, 1
                how = f"OLS residual t-interval over {k} budgets (df {k - 2})"
            else:
                est, lo, hi, n = slope, math.nan, math.nan, 1
                how = "no interval (2 budgets, 1 seed)"
            rows.append({"stage": stage, **row, "cell": cell_name(row, keys), "base_ratio": sub.base_ratio.iloc[0],
                         "budgets": k, "tokens_min": sub.tokens.min(), "tokens_max": sub.tokens.max(),
                         "slope_ols": slope, "slope": est, "lo": lo, "hi": hi, "seeds": n, "ci": how,
                         "gap_first": sub.gap.iloc[0], "gap_last": sub.gap.iloc[-1]})
    return pd.DataFrame(rows)


def ratio_effect(cells: pd.DataFrame, keys_by: dict[str, list[str]]) -> pd.DataFrame:
    """Cells matched on everything but the base ratio: gap at the lowest and highest ratio and d = high - low."""
    if cells.empty or cells.base_ratio.dropna().nunique() < 2:
        return pd.DataFrame()
    lo_r, hi_r = cells.base_ratio.min(), cells.base_ratio.max()
    rows = []
    for stage, keys in sorted(keys_by.items()):
        c = cells[cells.stage == stage]
        match = [k for k in keys if k != "ratio"] + ["tokens"]
        if c.empty or any(k not in c.columns for k in match):  # a stage without paired cells yet
            continue
        for combo, sub in c.groupby(match, dropna=False, sort=True):
            a, b = sub[sub.base_ratio == lo_r], sub[sub.base_ratio == hi_r]
            if len(a) != 1 or len(b) != 1:
                continue
            a, b = a.iloc[0], b.iloc[0]
            row = dict(zip(match, combo))
            se = math.sqrt(a.gap_se**2 + b.gap_se**2) if not (math.isnan(a.gap_se) or math.isnan(b.gap_se)) \
                else math.nan
            rows.append({"stage": stage, **row, "cell": cell_name(row, match), "ratio_low": lo_r,
                         "ratio_high": hi_r, "gap_low": a.gap, "gap_low_sd": a.gap_sd, "gap_high": b.gap,
                         "gap_high_sd": b.gap_sd, "d": b.gap - a.gap, "d_se": se})
    return pd.DataFrame(rows)


def headline(cells: pd.DataFrame) -> list[str]:
    """Plain-language summary of the gaps: per stage, in how many cells PC beats HPR, the gap's range,
    and the same split by base ratio."""
    if cells.empty:
        return []
    lines = []
    for stage, c in cells.groupby("stage", sort=True):
        won = int((c.gap < 0).sum())
        spread = (f"gap PC-HPR {fmt.signed(c.gap.iloc[0])}" if len(c) == 1 else
                  f"gap PC-HPR from {fmt.signed(c.gap.min())} to {fmt.signed(c.gap.max())} "
                  f"(mean {fmt.signed(c.gap.mean())})")
        line = f"stage `{stage}`: PC has the lower loss in {won} of {len(c)} cell{'s' * (len(c) != 1)}; {spread}"
        ratios = c.dropna(subset=["base_ratio"]).groupby("base_ratio", sort=True)
        if ratios.ngroups > 1:
            line += "; " + "; ".join(f"{fmt.value('ratio', r)} base: PC better in {int((g.gap < 0).sum())} of "
                                     f"{len(g)}, mean gap {fmt.signed(g.gap.mean())}" for r, g in ratios)
        lines.append(line)
    return lines


def _ci_text(est: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return f"{fmt.signed(est)} (no interval)"
    return f"{fmt.signed(est)} (95% CI {fmt.signed(lo)} to {fmt.signed(hi)})"


def verdict_ratio(effect: pd.DataFrame) -> Verdict:
    """Claim (a): the PC gain is larger on the high-ratio base (mean d < 0)."""
    if effect.empty:
        return Verdict("PC gains more over HPR on the higher tokens-per-parameter base", "inconclusive",
                       lines=["No cells are matched across two base ratios in this grid."])
    lo_r, hi_r = effect.ratio_low.iloc[0], effect.ratio_high.iloc[0]
    claim = (f"PC gains more over HPR on the {fmt.value('ratio', hi_r)} base than on the "
             f"{fmt.value('ratio', lo_r)} base")
    est, lo, hi, n = mean_ci(effect.d.tolist())
    how = f"t-interval over {n} matched cells (cells as replicates, df {n - 1})"
    if n == 1 and not math.isnan(effect.d_se.iloc[0]):
        lo, hi = est - 1.96 * effect.d_se.iloc[0], est + 1.96 * effect.d_se.iloc[0]
        how = "normal interval from the seeds' standard errors (1 matched cell)"
    v = Verdict(claim, verdict(lo, hi, claim_negative=True), est, lo, hi, n, how)
    r = lambda x: fmt.value("ratio", x)  # noqa: E731
    v.lines.append(f"d = gap({r(hi_r)}) - gap({r(lo_r)}), gap = loss(PC) - loss(HPR); negative d: PC's advantage "
                   f"is larger on the {r(hi_r)} base. Mean d = {_ci_text(est, lo, hi)}, {how}.")
    v.lines.append(f"Mean gap: {fmt.signed(effect.gap_high.mean())} on {r(hi_r)} vs "
                   f"{fmt.signed(effect.gap_low.mean())} on {r(lo_r)}.")
    for val, sub in effect.groupby("compression", sort=True):
        e, l2, h2, m = mean_ci(sub.d.tolist())
        v.lines.append(f"At {fmt.value('compression', val)}: mean d = {_ci_text(e, l2, h2)} over {m} cells.")
    for row in effect.itertuples():
        if row.d >= 0:
            v.exceptions.append(f"{row.stage}: {row.cell}: d = {fmt.signed(row.d)} (gap {fmt.signed(row.gap_high)} "
                                f"on {r(hi_r)} vs {fmt.signed(row.gap_low)} on {r(lo_r)})")
    return v


def verdict_tokens(slopes: pd.DataFrame) -> Verdict:
    """Claim (b): the PC gain grows with retraining tokens (mean slope of the gap on log2 tokens < 0)."""
    claim = "the PC gain grows with retraining tokens"
    if slopes.empty:
        return Verdict(claim, "inconclusive", lines=["No cell has two or more retraining budgets with both methods."])
    est, lo, hi, n = mean_ci(slopes.slope.tolist())
    how = f"t-interval over {n} cells' slopes (cells as replicates, df {n - 1})"
    if n == 1:
        lo, hi = slopes.lo.iloc[0], slopes.hi.iloc[0]
        how = slopes.ci.iloc[0]
    v = Verdict(claim, verdict(lo, hi, claim_negative=True), est, lo, hi, n, how)
    v.lines.append("slope: change of gap = loss(PC) - loss(HPR) per doubling of retraining tokens (OLS on "
                   f"log2 tokens); negative: the PC gain grows. Mean slope = {_ci_text(est, lo, hi)}, {how}.")
    sig_neg = int((slopes.hi < 0).sum())
    sig_pos = int((slopes.lo > 0).sum())
    v.lines.append(f"Cells: {int((slopes.slope < 0).sum())} of {len(slopes)} with a negative slope; "
                   f"{sig_neg} significantly negative, {sig_pos} significantly positive (own 95% CI).")
    for row in slopes.itertuples():
        if row.slope >= 0:
            v.exceptions.append(f"{row.stage}: {row.cell}: slope {_ci_text(row.slope, row.lo, row.hi)}; gap "
                                f"{fmt.signed(row.gap_first)} at {fmt.tokens(row.tokens_min)} -> "
                                f"{fmt.signed(row.gap_last)} at {fmt.tokens(row.tokens_max)}")
    return v


# -- tables --------------------------------------------------------------------------------------
def _pm(v: float, sd: float, n: int | None = None) -> str:
    s = fmt.signed(v)
    if not fmt.is_nan(sd):
        s += f" ± {fmt.num(sd)}"
    return s + (f" (n={n})" if n and n > 1 else "")


def trend_tables(cells: pd.DataFrame, slopes: pd.DataFrame, effect: pd.DataFrame):
    """Tables of the gaps per cell, the token slopes and the base-ratio effect."""
    from pcbench.report.tables import Table

    out = []
    if len(cells):
        c = cells.reset_index(drop=True)
        md = pd.DataFrame({"stage": c.stage, "cell": c.cell, "tokens": [fmt.tokens(t) for t in c.tokens],
                           "HPR": [fmt.num(v) for v in c.hpr], "PC": [fmt.num(v) for v in c.pc],
                           "gap PC-HPR": [_pm(g, s, n) for g, s, n in zip(c.gap, c.gap_sd, c.n_pairs)]})
        out.append(Table("gaps", "Gap per cell", fmt.md_table(md), c,
                         ["gap = mean loss(PC) - mean loss(HPR) (negative: PC better); ± s.d. of the per-seed "
                          "paired gaps (n seeds)."]))
    if len(slopes):
        s = slopes.reset_index(drop=True)
        md = pd.DataFrame({"stage": s.stage, "cell": s.cell, "budgets": s.budgets,
                           "gap first -> last": [f"{fmt.signed(a)} -> {fmt.signed(b)}"
                                                 for a, b in zip(s.gap_first, s.gap_last)],
                           "slope per doubling": [_ci_text(v, lo, hi) for v, lo, hi in zip(s.slope, s.lo, s.hi)],
                           "interval": s.ci})
        out.append(Table("trend_tokens", "Gap vs log2(retraining tokens): slope per cell", fmt.md_table(md), s,
                         ["slope of gap on log2(tokens) (negative: the PC gain grows with tokens)."]))
    if len(effect):
        e = effect.reset_index(drop=True)
        lo_r, hi_r = fmt.value("ratio", e.ratio_low.iloc[0]), fmt.value("ratio", e.ratio_high.iloc[0])
        md = pd.DataFrame({"stage": e.stage, "cell": e.cell, f"gap {lo_r}": [_pm(g, s) for g, s in
                                                                              zip(e.gap_low, e.gap_low_sd)],
                           f"gap {hi_r}": [_pm(g, s) for g, s in zip(e.gap_high, e.gap_high_sd)],
                           f"d = gap {hi_r} - gap {lo_r}": [_pm(d, s) for d, s in zip(e.d, e.d_se)]})
        out.append(Table("trend_ratio", "Gap vs base ratio", fmt.md_table(md), e,
                         [f"negative d: PC's advantage is larger on the {hi_r} base; gap ± s.d. over seeds, "
                          "d ± its standard error where seeds allow."]))
    return out
