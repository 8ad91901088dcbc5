"""REPORT.md: what was run, the tables, the figures and the trend verdicts (no "now" in it), as the text of
the parts in `contents.PARTS`."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Optional

from pcbench.report import fmt, reference
from pcbench.report.load import Study
from pcbench.report.tables import PAPER_GRIDS, Table
from pcbench.report.trends import DECISION, Verdict
from pcbench.store import ALL_STATES



def _utc(t: float) -> str:
    return datetime.fromtimestamp(float(t), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def busy_seconds(events) -> float:
    """Wall time during which at least one run was running: the union of each run's intervals from
    `running` to its next state change in the events log (gaps between invocations do not count)."""
    spans = []
    for _, ev in events.sort_values(["time"], kind="stable").groupby("run", sort=True):
        start = None
        for state, t in zip(ev.state, ev.time):
            if state == "running":  # a second `running` (resumed after a kill) restarts the span
                start = t
            elif start is not None:
                spans.append((start, t))
                start = None
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def runs_summary(study: Study) -> str:
    """Runs by stage and state, total train wall time and FLOPs, and the events log's time span."""
    r = study.runs
    if r.empty:
        return "No runs recorded in this store.\n"
    counts = r.groupby(["stage", "kind", "state"]).size().unstack("state", fill_value=0)
    counts = counts.reindex(columns=[s for s in ALL_STATES if s in counts.columns] +
                            sorted(set(counts.columns) - set(ALL_STATES)), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    lines = [fmt.md_table(counts.reset_index())]
    t = study.train
    lines.append(f"- runs: {len(r)} ({', '.join(f'{k}: {v}' for k, v in r.state.value_counts().sort_index().items())})")
    if len(t):
        lines.append(f"- train wall time (sum of final records): {fmt.duration(t.wall_seconds.sum())} over "
                     f"{len(t)} completed train runs; training time {fmt.duration(t.train_seconds.sum())}")
        lines.append(f"- train FLOPs (sum of final records): {fmt.sci(t.train_flops.sum())}; tokens trained: "
                     f"{fmt.tokens(t.tokens_seen.sum())}")
    ev = study.events
    if len(ev):
        t0, t1 = ev.time.min(), ev.time.max()
        lines.append(f"- events log: {len(ev)} state changes from {_utc(t0)} to {_utc(t1)} "
                     f"(span {fmt.duration(t1 - t0)}); wall time with at least one run running: "
                     f"{fmt.duration(busy_seconds(ev))}")
    return "\n".join(lines) + "\n"


def verdict_md(tag: str, v: Verdict) -> str:
    out = [f"**({tag}) \"{v.claim}\": {v.verdict.upper()}.**", ""]
    out += [f"- {line}" for line in v.lines]
    if v.exceptions:
        out.append(f"- Does not hold in {len(v.exceptions)} cell(s):")
        out += [f"  - {e}" for e in v.exceptions]
    elif v.n:
        out.append("- Holds (point estimate) in every cell.")
    return "\n".join(out) + "\n"


def table_md(t: Table, level: int = 3) -> str:
    out = [f"{'#' * level} {t.title}", "", t.markdown.rstrip(), ""]
    out += [f"_{n}_" for n in t.notes]
    out.append(f"\n(CSV: [tables/{t.name}.csv](tables/{t.name}.csv))\n")
    return "\n".join(out) + "\n"


def lr_text(used: Optional[Table]) -> str:
    if used is None or used.data.empty:
        return ""
    lines = []
    for (stage, method), d in used.data.groupby(["stage", "method"], sort=True):
        parts = [f"{lr:g} (runs: {n}{'; tuned from ' + src if src else ''})" for lr, n, src in
                 zip(d.lr, d.runs, d.tuned_from)]
        lines.append(f"- stage `{stage}`, {fmt.value('method', method)}: lr {'; '.join(parts)}")
    return "\n".join(lines) + "\n"


def reference_md(grid: str) -> str:
    if grid not in PAPER_GRIDS:
        return ""
    s = reference.summary()
    return "\n".join([
        "## The paper's numbers", "",
        "Transcribed once in `pcbench/report/paper_reference.yaml` (each cell with its table and row). Cells by "
        "position: exact (as printed), inferred (column inferred: our text copy lost the row's empty cells), "
        "lost (the worse of the HPR/PC pair, missing in our copy; never invented; known_elsewhere: recovered "
        "from Table 3). All cells: [tables/paper_reference.csv](tables/paper_reference.csv).", "",
        fmt.md_table(s), ""])


def headline_md(lines: list[str]) -> list[str]:
    return ["## Headline", ""] + [f"- {line}" for line in lines] + [""] if lines else []


def claims_verdicts_md() -> list[str]:
    """The verdicts section of a grid with the opening claims table: the verdicts are that table's."""
    return ["## Verdicts", "", "The verdicts are the opening table's: one estimator of the gap fitted over every "
            "cell at once (its interval decides each claim), in place of the pairwise trend verdicts of smaller "
            "grids. The per-cell slopes and the ratio contrasts are under Trends.", ""]


def verdicts_md(ratio: Verdict, tokens: Verdict) -> list[str]:
    return ["## Verdicts", "", f"_Decision rule: {DECISION}_", "", verdict_md("a", ratio), verdict_md("b", tokens)]


def learning_rates_md(tables: list[Table]) -> list[str]:
    """The LR sweep table (if any), then the rate each method used (the `lr_used` table as lines)."""
    by = {t.name: t for t in tables}
    if not by:
        return []
    out = ["## Learning rates", ""]
    if "lr_sweep" in by:
        out.append(table_md(by["lr_sweep"]))
    return out + ["Learning rate each method used:", "", lr_text(by.get("lr_used"))]


def figures_md(figures: list[tuple[str, str]]) -> list[str]:
    """Each figure drawn, (file, caption): a link and the image."""
    if not figures:
        return []
    return ["## Figures", ""] + [f"- {caption}: [figures/{name}](figures/{name})\n\n  ![{caption}](figures/{name})"
                                 for name, caption in figures] + [""]


def failed_md(failed: Table) -> list[str]:
    return ["## Failed runs", "", failed.markdown if len(failed.data) else "None.\n"]


def report(inp, built: list) -> str:
    """Assemble REPORT.md: the header, then each part's text in `contents.PARTS` order (`built`: each
    part with its tables; `inp`: the `contents.Inputs` they were built from)."""
    out = [f"# pcbench report: grid `{inp.study.grid}`", "",
           "Built from this grid's results store only (run.json, status.json, final.json, metrics.jsonl, "
           "recovery.jsonl, eval.json, events.jsonl). Loss: training cross-entropy averaged over the last 100 "
           "steps (the paper's metric). gap = loss(PC) - loss(HPR): negative means PC is better.", ""]
    for part, tables in built:
        out += part.text(inp, tables)
    return "\n".join(out).rstrip() + "\n"
