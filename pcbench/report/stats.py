"""Small statistics without scipy: Student-t quantiles, OLS slopes, t-intervals."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# two-sided 95% (0.975 quantile) for df = 1..30; beyond, a Cornish-Fisher expansion (error < 1e-5)
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (NaN for df < 1)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def ols_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error (NaN when fewer than 3 points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    xc = x - x.mean()
    sxx = float((xc**2).sum())
    slope = float((xc * (y - y.mean())).sum() / sxx)
    if len(x) < 3:
        return slope, math.nan
    resid = y - (y.mean() + slope * xc)
    return slope, math.sqrt(float((resid**2).sum()) / (len(x) - 2) / sxx)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float, int]:
    """Mean and its 95% t-interval (lo, hi) over `values`; NaN bounds with fewer than 2 values."""
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(v.mean())
    if n < 2:
        return m, math.nan, math.nan, n
    h = t975(n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    return m, m - h, m + h, n


def verdict(lo: float, hi: float, claim_negative: bool = True) -> str:
    """"supported" when the 95% CI lies on the claim's side of 0, "not supported" when it lies on the
    other side, else "inconclusive"."""
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    if (hi < 0) if claim_negative else (lo > 0):
        return "supported"
    if (lo > 0) if claim_negative else (hi < 0):
        return "not supported"
    return "inconclusive"


def binomial_se(p: float, n: float) -> float:
    """Standard error of an accuracy `p` measured on `n` items: sqrt(p (1 - p) / n) (NaN without n)."""
    if math.isnan(p) or math.isnan(n) or n <= 0:
        return math.nan
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def combined_se(*ses: float) -> float:
    """s.e. of a difference of independent estimates: sqrt(sum se^2) over the known ones (NaN if none is)."""
    known = [s for s in ses if not math.isnan(s)]
    return math.sqrt(sum(s * s for s in known)) if known else math.nan


def clearly_apart(a: float, b: float, se_a: float, se_b: float) -> bool:
    """|a - b| exceeds their combined standard error; with no s.e. known, any nonzero difference counts."""
    se = combined_se(se_a, se_b)
    return abs(a - b) > (0.0 if math.isnan(se) else se)
