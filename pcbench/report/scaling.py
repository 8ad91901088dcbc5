"""One estimator of the PC - HPR gap as a function of scale, for our records and the paper's numbers.

    gap = loss(PC) - loss(HPR)   (per cell: base x compression x retraining tokens, mean over seeds)
    gap ~ a + b log2(tokens) + c log2(ratio) + d log2(params) [+ e compression] [+ interactions]

fitted by ordinary least squares to cell means, with 95% t-intervals (residual variance, df = cells
- terms). Covariates are centred at the cells' means, so b, c, d are average effects. A term whose
covariate does not vary in the data is left out (and named); a candidate interaction (tokens x
ratio, tokens x size) stays only where its own interval excludes 0. `compression` enters as a
nuisance term: the grids differ in their levels. The paper's three claims are negative
coefficients: (a) c < 0, the PC gain grows with the base's tokens per parameter; (b) d < 0, with
the base's size; (c) b < 0, with the retraining tokens.

The crossover: the retraining tokens at which the fitted gap is 0 (PC overtakes HPR when b < 0),
per base ratio and size at compression 50% (the gap is linear in log2 tokens there: t* solves
g0 + s log2 t = 0), with a delta-method t-interval on log2 t*; reported only where the token slope
s at that base has an interval excluding 0.

Verdicts (`decide`): supported / not supported when the 95% interval excludes 0 (on the claim's /
the other side); "no effect at this scale, bounded" when it lies within +-BOUND; else "not decided",
with how many times the replicates would be needed for one of the two (half-widths shrink as
1/sqrt(n)). `claims_table(study)` is the report's opening table.

pandas/numpy only; reads a Study (the store) and `pcbench/report/reference.py` (the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from pcbench.report import fmt, reference
from pcbench.report.stats import t975

BOUND = 0.005  # loss: an effect within +-BOUND (per doubling) is "no effect at this scale"
TERMS = ("log2_tokens", "log2_ratio", "log2_params", "compression")
CLAIMS = {  # term -> the paper's claim (the gain grows with ...): a negative coefficient
    "log2_ratio": "(a) PC's gain over HPR grows with the base's tokens per parameter",
    "log2_params": "(b) PC's gain over HPR grows with the base's size",
    "log2_tokens": "(c) PC's gain over HPR grows with the retraining tokens",
}
REF_COMPRESSION = 0.5
# candidate interactions: kept in a fit only where their own interval excludes 0
INTERACTIONS = ("log2_tokens*log2_ratio", "log2_tokens*log2_params")

# Parameter counts of the paper's bases (total, embeddings included) and the Llama base's ratio.
PAPER_PARAMS = {"300M": 3.04e8, "800M": 8.34e8, "Llama-3.2-1B": 1.236e9}
# Llama-3.2-1B: "pretrained on up to 9 trillion tokens" (Meta's Llama 3.2 model card) / 1.236e9 parameters
LLAMA_RATIO = float(round(9e12 / 1.236e9))


@dataclass
class Fit:
    """An OLS fit of gap on `terms` (coefficients in `coef`, intercept first). Covariates are centred
    at `center` (the cells' means), so each main effect is the average effect over the cells even
    when an interaction `u*v` (product of centred covariates) is in the fit."""

    terms: list[str]
    coef: np.ndarray
    cov: np.ndarray
    df: int
    sigma: float
    n: int
    center: dict = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    label: str = ""

    def names(self) -> list[str]:
        return ["intercept", *self.terms]

    def estimate(self, term: str) -> tuple[float, float, float]:
        """(estimate, lo, hi) of one coefficient; NaN for a term the fit left out."""
        if term not in self.names():
            return math.nan, math.nan, math.nan
        i = self.names().index(term)
        return self._interval(float(self.coef[i]), np.eye(len(self.coef))[i])

    def _interval(self, est: float, grad: np.ndarray) -> tuple[float, float, float]:
        se = math.sqrt(max(float(grad @ self.cov @ grad), 0.0))
        h = t975(self.df) * se if self.df >= 1 else math.nan
        return est, est - h, est + h

    def row(self, x: dict) -> np.ndarray:
        """The design row of raw covariates `x` (log2_tokens, log2_ratio, log2_params, compression)."""
        c = {k: float(x[k]) - self.center.get(k, 0.0) for k in self.center}
        return np.array([1.0] + [math.prod(c[v] for v in t.split("*")) for t in self.terms])

    def predict(self, x: dict) -> float:
        return float(self.row(x) @ self.coef)

    def token_slope(self, x: dict) -> tuple[float, float, float]:
        """d gap / d log2(tokens) at covariates `x` (with its interval): b plus any interactions."""
        g = self.row({**x, "log2_tokens": self.center.get("log2_tokens", 0.0) + 1.0}) - \
            self.row({**x, "log2_tokens": self.center.get("log2_tokens", 0.0)})
        return self._interval(float(g @ self.coef), g)

    def crossover(self, x: dict) -> tuple[float, float, float]:
        """log2 retraining tokens where the fitted gap is 0 at covariates `x` (tokens ignored), with a
        delta-method 95% interval; NaN when the fit has no token term."""
        if not any("log2_tokens" in t.split("*") for t in self.terms):
            return math.nan, math.nan, math.nan
        z0 = self.row({**x, "log2_tokens": 0.0})
        dz = self.row({**x, "log2_tokens": 1.0}) - z0  # the gap is linear in log2 tokens
        g0, slope = float(z0 @ self.coef), float(dz @ self.coef)
        lt = -g0 / slope
        return self._interval(lt, -z0 / slope + g0 / slope**2 * dz)


def covariates(df: pd.DataFrame) -> pd.DataFrame:
    """The fit's covariates from tokens, ratio, params and compression columns."""
    return pd.DataFrame({"log2_tokens": np.log2(df.tokens.astype(float)),
                         "log2_ratio": np.log2(df.ratio.astype(float)),
                         "log2_params": np.log2(df.params.astype(float)),
                         "compression": df.compression.astype(float)}, index=df.index)


def _ols(X: pd.DataFrame, y: np.ndarray, terms: list[str], center: dict, label: str,
         dropped: list[str]) -> Optional[Fit]:
    cols = [np.ones(len(X))] + [np.prod([X[v].to_numpy() - center[v] for v in t.split("*")], axis=0) for t in terms]
    A = np.column_stack(cols)
    n, p = A.shape
    if n <= p or np.linalg.matrix_rank(A) < p:
        return None
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    df = n - p
    s2 = float(resid @ resid) / df
    return Fit(list(terms), coef, s2 * np.linalg.inv(A.T @ A), df, math.sqrt(s2), n, center, dropped, label)


def fit_gap(cells: pd.DataFrame, terms: Sequence[str] = TERMS, label: str = "",
            interactions: Sequence[str] = ()) -> Optional[Fit]:
    """OLS of `gap` on `terms` over cells (columns tokens, ratio, params, compression, gap); terms
    that do not vary are dropped. Each candidate interaction (`"log2_tokens*log2_ratio"`) is kept
    only where justified: its own 95% interval excludes 0 in the fit with the candidates. None when
    there are no more cells than coefficients."""
    c = cells.dropna(subset=["gap", "tokens", "ratio", "params", "compression"])
    if c.empty:
        return None
    X = covariates(c)
    keep = [t for t in terms if X[t].nunique() > 1]
    dropped = [t for t in terms if t not in keep]
    cand = [i for i in interactions if all(v in keep for v in i.split("*"))]
    center = {k: float(X[k].mean()) for k in X.columns}
    y = c.gap.to_numpy(float)
    fit = _ols(X, y, keep + cand, center, label, dropped)
    if fit is None or not cand:
        return fit
    justified = [i for i in cand if (lambda e: e[1] > 0 or e[2] < 0)(fit.estimate(i))]
    out = fit if justified == cand else _ols(X, y, keep + justified, center, label, dropped)
    out.dropped = dropped + [f"{i} (not justified)" for i in cand if i not in justified]
    return out


def expected_halfwidths(cells: pd.DataFrame, sigma: float, terms: Sequence[str] = TERMS) -> dict[str, float]:
    """Sizing a study before it runs: the 95% half-width of each coefficient that a fit over these
    planned cells (tokens, ratio, params, compression; no gaps needed) would have at residual s.d.
    `sigma` (e.g. a finished study's)."""
    X = covariates(cells)
    keep = [t for t in terms if X[t].nunique() > 1]
    A = np.column_stack([np.ones(len(X))] + [X[t].to_numpy() - X[t].mean() for t in keep])
    df = len(X) - A.shape[1]
    se = sigma * np.sqrt(np.diag(np.linalg.inv(A.T @ A)))
    return {t: float(t975(df) * e) for t, e in zip(["intercept", *keep], se)}


# -- verdicts --------------------------------------------------------------------------------------
def decide(est: float, lo: float, hi: float, claim_negative: bool = True, bound: float = BOUND) -> str:
    """supported / not supported (95% interval excludes 0), "no effect at this scale, bounded" (within
    +-bound), else "not decided: about k x the replicates needed" (or "no estimate")."""
    if any(math.isnan(v) for v in (est, lo, hi)):
        return "no estimate (the data do not vary this covariate)"
    if hi < 0 or lo > 0:
        return "supported" if (hi < 0) == claim_negative else "not supported"
    if -bound <= lo and hi <= bound:
        return "no effect at this scale, bounded"
    return f"not decided: about {replicates_needed(est, lo, hi, bound):.3g}x the replicates needed"


def replicates_needed(est: float, lo: float, hi: float, bound: float = BOUND) -> float:
    """Factor on the replicates (half-width ~ 1/sqrt(n)) for the interval to exclude 0 or to fit in
    +-bound, whichever comes first at the same estimate."""
    h = (hi - lo) / 2
    options = []
    if est != 0:
        options.append((h / abs(est)) ** 2)
    if abs(est) < bound:
        options.append((h / (bound - abs(est))) ** 2)
    return max(1.0, min(options)) if options else math.inf


# -- the data --------------------------------------------------------------------------------------
def paper_cells(poster: bool = True) -> pd.DataFrame:
    """The paper's gaps where both methods have a number: Table A.2 (Table 1 is its 80:1 subset; its
    80:1 pairs survive only where Table 3 gives the HPR cell) and, with `poster`, the poster's Llama
    rows without dataset alignment. Columns: source, model, params, ratio, compression, tokens, hpr, pc, gap."""
    a2 = reference.table_a2()
    a2 = a2.assign(loss=a2.loss.where(a2.loss.notna(), a2.known_loss))
    frames = [("Table A.2", a2)]
    if poster:
        p = reference.poster()
        frames.append(("poster", p[p.variant == "standard"].assign(ratio=LLAMA_RATIO)))
    rows = []
    for src, df in frames:
        for (model, ratio, comp, tok), g in df.groupby(["model", "ratio", "compression", "tokens"], sort=True):
            m = dict(zip(g.method, g.loss))
            if not (np.isfinite(m.get("hpr", np.nan)) and np.isfinite(m.get("pc", np.nan))):
                continue
            rows.append({"source": src, "model": model, "params": PAPER_PARAMS[model], "ratio": float(ratio),
                         "compression": comp, "tokens": tok, "hpr": m["hpr"], "pc": m["pc"],
                         "gap": m["pc"] - m["hpr"], "n": 1})
    return pd.DataFrame(rows)


def our_cells(study, stages: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Our gaps per cell (base x compression x tokens x other labels), seeds averaged, from the store:
    completed PC/HPR runs of the pair stages (default: `compress` if the grid has it, else every pair
    stage) without distillation. Columns as `paper_cells`, plus stage, base_id and n (paired seeds)."""
    from pcbench.report.tables import NOT_KEYS, compress_runs, pair_stages

    t = compress_runs(study)
    if t.empty:
        return pd.DataFrame()
    have = pair_stages(study)
    stages = list(stages) if stages else (["compress"] if "compress" in have else have)
    t = t[t.stage.isin(stages)]
    if "distill" in t.columns:
        t = t[pd.to_numeric(t["distill"], errors="coerce").fillna(0) == 0]
    base_params = dict(zip(study.train.id, study.train.params))
    extra = [k for k in study.labels if k not in NOT_KEYS and k not in ("lr", "distill") and k in t.columns]
    keys = ["stage", "base_id", "compression", "tokens", *[k for k in extra if k not in ("ratio",)]]
    rows = []
    for combo, g in t.groupby(keys, dropna=False, sort=True):
        per = g.groupby(["seed", "method"]).loss.mean().unstack("method")
        if not {"hpr", "pc"} <= set(per.columns):
            continue
        d = (per.pc - per.hpr).dropna()
        if d.empty:
            continue
        row = dict(zip(keys, combo))
        rows.append({**row, "source": "ours", "params": base_params.get(row["base_id"], math.nan),
                     "ratio": float(g.base_ratio.iloc[0]), "hpr": float(per.hpr.mean()), "pc": float(per.pc.mean()),
                     "gap": float(d.mean()), "n": len(d)})
    return pd.DataFrame(rows)


# -- the opening table -----------------------------------------------------------------------------
def _ci(est: float, lo: float, hi: float) -> str:
    if math.isnan(est):
        return "-"
    return f"{fmt.signed(est)} [{fmt.signed(lo)}, {fmt.signed(hi)}]"


def crossovers(fit: Optional[Fit], cells: pd.DataFrame) -> pd.DataFrame:
    """Per (ratio, params) of the cells: fitted crossover tokens at 50% compression with its interval,
    only where the token slope there has an interval excluding 0 (noted when outside the measured
    budgets)."""
    if fit is None or cells.empty:
        return pd.DataFrame()
    t_min, t_max = float(cells.tokens.min()), float(cells.tokens.max())
    rows = []
    for (r, p), _ in cells.groupby(["ratio", "params"], sort=True):
        x = {"log2_tokens": 0.0, "log2_ratio": math.log2(r), "log2_params": math.log2(p),
             "compression": REF_COMPRESSION}
        b, blo, bhi = fit.token_slope(x) if "log2_tokens" in fit.terms else (math.nan,) * 3
        row = {"fit": fit.label, "ratio": r, "params": p, "slope": b, "slope_lo": blo, "slope_hi": bhi}
        if math.isnan(b) or blo <= 0 <= bhi:
            row.update(log2_tokens=math.nan, lo=math.nan, hi=math.nan, tokens=math.nan, tokens_lo=math.nan,
                       tokens_hi=math.nan, note="none: the token slope's interval contains 0")
        else:
            g, lo, hi = fit.crossover(x)
            inside = t_min <= 2**g <= t_max
            row.update(log2_tokens=g, lo=lo, hi=hi, tokens=2**g, tokens_lo=2**lo, tokens_hi=2**hi,
                       note=("PC ahead above it" if b < 0 else "PC ahead below it") +
                       ("" if inside else f"; extrapolated: budgets measured {fmt.tokens(t_min)}-{fmt.tokens(t_max)}"))
        rows.append(row)
    return pd.DataFrame(rows)


def claims(papers: dict[str, Optional[Fit]], ours: Optional[Fit]) -> pd.DataFrame:
    """One row per claim: each paper fit's coefficient (columns `<name>`, `<name>_lo`, `<name>_hi`,
    `<name>_verdict`) and ours with intervals, and our verdict."""
    rows = []
    for term, claim in CLAIMS.items():
        row = {"claim": claim, "term": term}
        for name, fit in papers.items():
            e = fit.estimate(term) if fit else (math.nan,) * 3
            row.update({name: e[0], f"{name}_lo": e[1], f"{name}_hi": e[2], f"{name}_verdict": decide(*e)})
        oe = ours.estimate(term) if ours else (math.nan,) * 3
        rows.append({**row, "ours": oe[0], "ours_lo": oe[1], "ours_hi": oe[2], "verdict": decide(*oe)})
    return pd.DataFrame(rows)


def _xo_text(x: pd.DataFrame) -> str:
    if x.empty:
        return "-"
    if x.tokens.isna().all() and x.note.nunique() == 1:
        return x.note.iloc[0]
    parts = []
    for r in x.itertuples():
        where = f"{fmt.value('ratio', r.ratio)}, {fmt.tokens(r.params)} params"
        side = r.note.split(";")[0]  # PC ahead above it (it overtakes HPR there) or below it (it falls behind)
        parts.append(f"{where}: " + (r.note if math.isnan(r.tokens) else
                                     f"{fmt.tokens(r.tokens)} [{fmt.tokens(r.tokens_lo)}, {fmt.tokens(r.tokens_hi)}]"
                                     + f" ({side}" + ("; extrapolated)" if "extrapolated" in r.note else ")")))
    return "; ".join(parts)


def claims_table(study):
    """The report's opening table: claim | the paper's numbers, fitted | ours | verdict. Only for the
    `scaling` grid or a grid whose cells vary retraining tokens, base ratio and base size (else None)."""
    from pcbench.report.tables import Table

    mine = our_cells(study)
    if mine.empty or not (study.grid == "scaling" or all(mine[c].nunique() > 1 for c in ("tokens", "ratio", "params"))):
        return None
    ours = fit_gap(mine, label="ours", interactions=INTERACTIONS)
    if ours is None:
        return None
    sources = {"paper_a2": paper_cells(poster=False), "paper_all": paper_cells(poster=True)}
    fits = {k: fit_gap(c, label=k, interactions=INTERACTIONS) for k, c in sources.items()}
    paper = fits["paper_all"]
    data = claims(fits, ours)
    names = {"paper_a2": "Table A.2", "paper_all": "with the poster"}

    def paper_text(row) -> str:
        return "; ".join(f"{names[k]}: {_ci(row[k], row[k + '_lo'], row[k + '_hi'])} ({row[k + '_verdict']})"
                         for k in fits)

    md = pd.DataFrame({"claim": data.claim,
                       "the paper's numbers, fitted": [paper_text(r) for r in data.to_dict("records")],
                       "ours": [_ci(a, b, c) for a, b, c in zip(data.ours, data.ours_lo, data.ours_hi)],
                       "verdict": data.verdict})
    xo_p = {k: crossovers(f, sources[k]) for k, f in fits.items()}
    xo_o = crossovers(ours, mine)
    md.loc[len(md)] = ["crossover: retraining tokens where the fitted gap is 0 (50% compression; PC ahead on the side named)",
                       "; ".join(f"{names[k]}: {_xo_text(x)}" for k, x in xo_p.items()), _xo_text(xo_o), ""]
    xo = pd.concat([*xo_p.values(), xo_o], ignore_index=True)
    data = pd.concat([data, xo.assign(claim="crossover")], ignore_index=True)
    dropped = ", ".join(ours.dropped) or "none"
    inter = lambda f: ", ".join(t for t in f.terms if "*" in t) or "none"  # noqa: E731
    notes = [f"Coefficients of one OLS fit per source: gap = loss(PC) - loss(HPR) ~ a + b log2(tokens) + "
             f"c log2(ratio) + d log2(params) + e compression (+ justified interactions), over cell means (seeds "
             f"averaged), covariates centred (b, c, d: average effects per doubling), 95% t-intervals. Ours: "
             f"{ours.n} cells, df {ours.df}, residual s.d. {fmt.num(ours.sigma)}, interactions kept: {inter(ours)}; "
             f"left out: {dropped}. The paper: {fits['paper_a2'].n} Table A.2 pairs where both "
             f"numbers survive (the 20:1 rows, and the two 80:1 cells whose HPR number Table 3 gives: our copy "
             f"lost the worse of every other 80:1 pair), then with the poster's Llama rows ({paper.n} cells; "
             f"base ratio {LLAMA_RATIO:.0f}:1 from 9T pretraining tokens); interactions kept: "
             f"{inter(fits['paper_a2'])} / {inter(paper)}.",
             f"Verdict: supported / not supported when the 95% interval excludes 0; no effect at this scale, "
             f"bounded, when it lies within +-{BOUND}; else not decided (with the replicates it would need)."]
    return Table("claims", "The paper's claims: fitted on its numbers and on ours", fmt.md_table(md), data, notes)
