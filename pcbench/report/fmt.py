"""Formatting shared by tables, figures, REPORT.md and the CLI's tables: numbers, token counts, the
human words for label keys (one place: LABELS), markdown tables, plain-text tables."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

from pcbench.spec import methods

if TYPE_CHECKING:
    import pandas as pd  # tables come in as DataFrames; this module itself never needs pandas


def is_nan(x: Any) -> bool:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return True
    pd = sys.modules.get("pandas")  # pd.NA exists only once pandas is loaded (CLI tables do not load it)
    return pd is not None and x is pd.NA


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
        return methods.label(v)  # the registry's label (HPR, PC, ...); other names as they are
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)



# label key -> how a reader sees "key value" (titles, legends, cell names); {} is fmt.value(key, value)
LABELS = {
    "stage": "stage {}", "parent_stage": "stage {}", "ratio": "{} base", "base_ratio": "{} base",
    "importance": "{} importance", "compression": "{} compression", "tokens": "{} tokens",
    "seed": "seed {}", "lr": "lr {}", "method": "{}", "model": "{}", "task": "{}",
}
METRICS = {"loss", "heldout", "score", "average"}   # CLI/table columns shown with fixed decimals


def phrase(key: str, v: Any) -> str:
    """A label as words: ("ratio", 80) -> "80:1 base", ("importance", "activation") -> "activation importance"."""
    return LABELS.get(key, key.replace("_", " ") + " {}").format(value(key, v))


def phrases(keys: list[str], values) -> str:
    """Several labels as one phrase ("50% compression, 80:1 base"); missing values left out."""
    return ", ".join(phrase(k, v) for k, v in zip(keys, values) if not is_nan(v))


def cell(col: str, v: Any, digits: int = 4) -> str:
    """A value as a table cell: metrics with fixed decimals, labels as in `value` ("-" when missing)."""
    return num(v, digits) if col in METRICS else value(col, v)


def text_table(rows: list[dict]) -> str:
    """A plain-text table of `rows` (every cell through `cell`; missing cells "-"), columns in first-seen order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    if not cols:
        return "(no rows)"
    body = [[cell(c, r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, width)).rstrip()  # noqa: E731
    return "\n".join([line(cols)] + [line(b) for b in body])


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
