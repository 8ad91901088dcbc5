"""Is each tuned value bracketed by its sweep? From the store alone.

A run tuned from a sweep records the sweep run it took its value from (`final.json` `tuned`). That
run's sweep line is the runs of its stage sharing every label but the swept one (the label whose
value is the tuned value). The tuned value is bracketed when the line tried a smaller and a larger
value; otherwise the optimum may lie beyond the sweep and the report flags it.
"""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from pcbench.report import fmt
from pcbench.report.load import Study


def _axis(sweep_row: dict, value: float) -> Optional[str]:
    for k in str(sweep_row.get("label_keys") or "").split(","):
        try:
            if k and math.isclose(float(sweep_row[k]), value, rel_tol=1e-12):
                return k
        except (TypeError, ValueError):
            continue
    return None


def tuned_lines(study: Study) -> pd.DataFrame:
    """One row per (stage, sweep run tuned from): the tuned value, its sweep line's values, bracketed."""
    r = study.runs
    if r.empty or "tuned_from" not in r or r.tuned_from.dropna().empty:
        return pd.DataFrame()
    by_id = {row["id"]: row for row in r.to_dict("records")}
    rows = []
    for (stage, src), d in r[r.tuned_from.notna()].groupby(["stage", "tuned_from"], sort=True):
        sw = by_id.get(src)
        value = float(d.lr_used.iloc[0])
        axis = _axis(sw, value) if sw else None
        if sw is None or axis is None:
            rows.append({"stage": stage, "runs": len(d), "value": value, "sweep_stage": sw and sw["stage"],
                         "line": "", "values": "", "bracketed": False})
            continue
        keys = [k for k in str(sw["label_keys"]).split(",") if k and k != axis]
        same = r[(r.stage == sw["stage"]) & (r.state == "completed")]
        for k in keys:
            same = same[same[k].astype(str) == str(sw[k])]
        vals = sorted(float(v) for v in same[axis])
        rows.append({"stage": stage, "runs": len(d), "value": value, "sweep_stage": sw["stage"],
                     "line": fmt.phrases(keys, [sw[k] for k in keys]),
                     "values": " ".join(f"{v:g}" for v in vals),
                     "bracketed": bool(vals) and vals[0] < value < vals[-1]})
    return pd.DataFrame(rows)


def tuning_table(study: Study):
    """The tuned values with a flag on each one its sweep does not bracket (None without tuned runs)."""
    from pcbench.report.tables import Table

    data = tuned_lines(study)
    if data.empty:
        return None
    md = pd.DataFrame({"stage": data.stage, "runs": data.runs, "tuned value": [f"{v:g}" for v in data.value],
                       "sweep": [f"`{s}` {line}".rstrip() for s, line in zip(data.sweep_stage, data.line)],
                       "values tried": data["values"],
                       "bracketed": ["yes" if b else "**NO: at the sweep's edge**" for b in data.bracketed]})
    n_bad = int((~data.bracketed).sum())
    notes = ["A tuned value is bracketed when its sweep line tried a smaller and a larger value (sweeps with "
             "`extend` add runs beyond an edge until it is, up to a limit)."]
    if n_bad:
        notes.append(f"{n_bad} tuned value(s) sit at the edge of their sweep: the best value may lie outside it.")
    return Table("tuning", "Tuned values and whether their sweep brackets them", fmt.md_table(md), data, notes)
