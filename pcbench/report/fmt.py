"""Formatting shared by tables and REPORT.md: numbers, token counts, markdown tables."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def is_nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA


def tokens(t: Any) -> str:
    """1.25e9 -> "1.25B", 800000 -> "800k", 3.2e6 -> "3.2M"."""
    if is_nan(t):
        return "-"
    t = float(t)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(t) >= div:
            return f"{t / div:.4g}{suffix}"
    return f"{t:.4g}"


def value(col: str, v: Any) -> str:
    """A label value for display: compression as a percentage, integral floats as ints."""
    if is_nan(v):
        return "-"
    if col == "compression":
        return f"{float(v) * 100:.4g}%"
    if col in ("tokens", "tokens_seen"):
        return tokens(v)
    if col == "ratio":
        return f"{float(v):g}:1"
    if col == "method":
        return str(v).upper() if str(v) in ("pc", "hpr") else str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def num(v: Any, digits: int = 4) -> str:
    return "-" if is_nan(v) else f"{float(v):.{digits}f}"


def signed(v: Any, digits: int = 4) -> str:
    return "-" if is_nan(v) else f"{float(v):+.{digits}f}"


def sci(v: Any) -> str:
    return "-" if is_nan(v) else f"{float(v):.3g}"


def duration(seconds: Any) -> str:
    if is_nan(seconds):
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def md_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of `df` (cells are str()-ed; pipes escaped)."""
    if df.empty:
        return "_(no rows)_\n"
    cols = [str(c) for c in df.columns]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if is_nan(v) else esc(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
