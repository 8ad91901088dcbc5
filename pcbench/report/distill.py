"""Distillation baselines beside the plain methods: HPR, HPR + KD, PC, PC + KD per cell.

A distilled run (label `distill` > 0: the frozen base as teacher, loss (1-a) CE + a T^2 KL) is
matched to the plain runs of the same base, compression level and retraining tokens (seed 0, where
the distilled runs have no seed axis; every seed they share otherwise). Losses are the training
cross-entropy over the last 100 steps (the distillation term is not in it), so the four columns
compare directly; "KD effect" is loss(+KD) - loss(plain), negative when distillation helps.

pandas only; reads a Study (the store).
"""

from __future__ import annotations

from typing import Optional

import pandas as pd

from pcbench.report import fmt
from pcbench.report.tables import Table, base_names, compress_runs, sweep_stages

KEYS = ["base_id", "compression", "tokens"]


def _distilled(df: pd.DataFrame) -> pd.Series:
    if "distill" not in df.columns:
        return pd.Series(False, index=df.index)
    return pd.to_numeric(df["distill"], errors="coerce").fillna(0) > 0


def distill_cells(study) -> pd.DataFrame:
    """One row per (base, compression, tokens, method) that has distilled runs: plain and distilled
    loss (mean over the shared seeds), their difference and the seeds used."""
    t = compress_runs(study)
    if t.empty or not _distilled(t).any():
        return pd.DataFrame()
    t = t[t.state == "completed"] if "state" in t.columns else t
    kd, plain = t[_distilled(t)], t[~_distilled(t)]
    plain = plain[~plain.stage.isin(sweep_stages(study))]
    rows = []
    for (base, comp, tok, method), g in kd.groupby(KEYS + ["method"], sort=True):
        p = plain[(plain.base_id == base) & (plain.compression == comp) & (plain.tokens == tok)
                  & (plain.method == method)]
        seeds = sorted(set(g.seed.dropna()) & set(p.seed.dropna()))
        if not seeds:
            continue
        a = float(p[p.seed.isin(seeds)].loss.mean())
        b = float(g[g.seed.isin(seeds)].loss.mean())
        rows.append({"base_id": base, "compression": comp, "tokens": tok, "method": method,
                     "alpha": float(pd.to_numeric(g["distill"]).iloc[0]), "plain": a, "distilled": b,
                     "kd_effect": b - a, "seeds": ",".join(str(int(s)) for s in seeds)})
    return pd.DataFrame(rows)


def distill_table(study) -> Optional[Table]:
    """HPR | HPR + KD | PC | PC + KD per (base, compression, tokens); None without distilled runs."""
    cells = distill_cells(study)
    if cells.empty:
        return None
    names = base_names(study)
    size = {r["id"]: (r.get("params"), r.get("tokens")) for r in study.train.to_dict("records")}
    order = sorted(cells.groupby(KEYS, sort=True), key=lambda kv: (size.get(kv[0][0], (0, 0)), kv[0]))
    rows = []
    for (base, comp, tok), g in order:
        m = {r.method: r for r in g.itertuples()}
        row = {"base": names.get(base, base), "compression": fmt.value("compression", comp),
               "tokens": fmt.tokens(tok)}
        for method, label in (("hpr", "HPR"), ("pc", "PC")):
            r = m.get(method)
            row[label] = fmt.num(r.plain) if r else "-"
            row[f"{label} + KD"] = fmt.num(r.distilled) if r else "-"
            row[f"KD effect, {label}"] = fmt.signed(r.kd_effect) if r else "-"
        both = m.get("hpr") is not None and m.get("pc") is not None
        row["PC - HPR, plain / + KD"] = (f"{fmt.signed(m['pc'].plain - m['hpr'].plain)} / "
                                         f"{fmt.signed(m['pc'].distilled - m['hpr'].distilled)}" if both else "-")
        rows.append(row)
    alpha = sorted(set(cells.alpha))
    notes = [f"Training cross-entropy (last 100 steps; lower is better) of runs distilled from the frozen base "
             f"(alpha {', '.join(fmt.num(a, 2) for a in alpha)}: loss (1-alpha) CE + alpha T^2 KL, as the authors' code) "
             f"beside the plain runs of the same base, level and budget at the same lr and seeds "
             f"({'; '.join(sorted(set(cells.seeds)))}). KD effect: loss(+KD) - loss(plain), negative when "
             f"distillation helps. {_summary(cells)}"]
    return Table("distill", "Distillation baselines: HPR and PC with and without the frozen base as teacher",
                 fmt.md_table(pd.DataFrame(rows)), cells.assign(base=cells.base_id.map(names)), notes)


def _summary(cells: pd.DataFrame) -> str:
    parts = []
    for method, label in (("hpr", "HPR"), ("pc", "PC")):
        c = cells[cells.method == method]
        if len(c):
            helped = int((c.kd_effect < 0).sum())
            parts.append(f"{label}: distillation lowered the loss in {helped} of {len(c)} cells "
                         f"(mean effect {fmt.signed(float(c.kd_effect.mean()))})")
    return "; ".join(parts) + "." if parts else ""

