"""The paper's own numbers (`paper_reference.yaml`) as tidy DataFrames, one function per table.

Every frame has one row per cell with: source (table and row), table, model, ratio, method,
compression, tokens, loss (NaN where our copy lost it), position ("exact" | "inferred" | "lost"),
lost (why a cell is missing, else None), known_loss / known_from (a lost cell recovered from
another table), note. Lower loss is better everywhere.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

REFERENCE = Path(__file__).with_name("paper_reference.yaml")
COLUMNS = ["source", "table", "model", "ratio", "variant", "importance", "method", "compression", "tokens",
           "loss", "position", "lost", "known_loss", "known_from", "note"]


@lru_cache(maxsize=1)
def _raw() -> dict:
    return yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))


def _pct(c: float) -> str:
    return f"{round(c * 100)}%"


def _tok(t: float) -> str:
    return f"{t / 1e9:g}B"


def _cells(row: dict, tokens: list[float], table: str, source: str, where: str, lost_default: str,
           **fixed: Any) -> list[dict]:
    out = []
    known = {float(k): v for k, v in (row.get("known") or {}).items()}
    notes = {float(k): v for k, v in (row.get("notes") or {}).items()}
    for t, loss in zip(tokens, row["loss"]):
        present = loss is not None
        k = known.get(t)
        out.append({
            **{c: None for c in COLUMNS}, **fixed,
            "source": f"{source}; {where} {row['method'].upper()} row, {_tok(t)}",
            "table": table, "method": row["method"], "tokens": t,
            "loss": float(loss) if present else math.nan,
            "position": row.get("position", "exact") if present else "lost",
            "lost": None if present else row.get("lost", lost_default),
            "known_loss": float(k["loss"]) if k else math.nan,
            "known_from": k["source"] if k else None,
            "note": notes.get(t),
        })
    return out


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("ratio", "compression", "tokens", "loss", "known_loss"):
        df[c] = pd.to_numeric(df[c])
    return df.reset_index(drop=True)


def table_a2() -> pd.DataFrame:
    """Table A.2 ("All experiments"): GPT-2-style 300M/800M, 20:1 and 80:1, 35/50/65%, 1.25-10B tokens."""
    t = _raw()["table_a2"]
    tokens = [float(x) for x in t["tokens"]]
    rows = []
    for r in t["rows"]:
        where = f"{r['model']} {r['ratio']}:1 {_pct(r['compression'])}"
        rows += _cells(r, tokens, "A.2", "Table A.2", where, "worse-of-pair", model=r["model"],
                       ratio=r["ratio"], compression=r["compression"], importance="random")
    return _frame(rows)


def table1() -> pd.DataFrame:
    """Table 1 (main text): the 80:1 rows of Table A.2 (identical cells in our copy)."""
    df = table_a2()
    df = df[df.ratio == 80].copy()
    df["table"] = "1"
    df["source"] = df.source.str.replace("Table A.2;", "Table 1 (= Table A.2 80:1 rows);", regex=False)
    return df.reset_index(drop=True)


def base_losses() -> pd.DataFrame:
    """The base models' losses (Appendix A.2): model, ratio, loss."""
    b = _raw()["base"]
    rows = [{**{c: None for c in COLUMNS}, "source": f"{b['source']}; {r['model']} {r['ratio']}:1 row",
             "table": "base", "model": r["model"], "ratio": r["ratio"], "method": "pretrain",
             "loss": float(r["loss"]), "position": "exact", "known_loss": math.nan} for r in b["rows"]]
    return _frame(rows)


def table3() -> pd.DataFrame:
    """Table 3: random vs magnitude importance, 800M 80:1 at 50%, 2.5B and 5B tokens."""
    t = _raw()["table3"]
    tokens = [float(x) for x in t["tokens"]]
    rows = []
    for r in t["rows"]:
        rows += _cells(r, tokens, "3", "Table 3", f"{r['importance']}", "row-missing", model=t["model"],
                       ratio=t["ratio"], compression=t["compression"], importance=r["importance"])
    return _frame(rows)


def poster() -> pd.DataFrame:
    """The poster's Llama-3.2-1B table: 90/70/50% and 50% with dataset alignment, 1-6B tokens."""
    t = _raw()["poster"]
    tokens = [float(x) for x in t["tokens"]]
    rows = []
    for r in t["rows"]:
        where = f"{_pct(r['compression'])}{' with ' + r['variant'] if r['variant'] != 'standard' else ''}"
        rows += _cells(r, tokens, "poster", t["source"], where, "worse-of-pair", model=t["model"],
                       compression=r["compression"], variant=r["variant"], importance="random")
    return _frame(rows)


def all_tables() -> pd.DataFrame:
    """Every transcribed cell (Table 1 is not repeated: it is a view of Table A.2)."""
    return pd.concat([base_losses(), table_a2(), table3(), poster()], ignore_index=True)


def summary() -> pd.DataFrame:
    """Cells per table by position (exact / inferred / lost) and how many lost ones are known elsewhere."""
    df = all_tables()
    out = df.groupby(["table", "position"]).size().unstack(fill_value=0)
    out["known_elsewhere"] = df.assign(k=df.known_loss.notna()).groupby("table").k.sum()
    return out.reset_index()


def paper_model(label: Any) -> Optional[str]:
    """Our model label -> the paper's model name ("gpt2-300m" -> "300M"), None if it names neither."""
    m = re.search(r"(\d+)\s*([mb])", str(label).lower())
    return f"{m.group(1)}{m.group(2).upper()}" if m else None
