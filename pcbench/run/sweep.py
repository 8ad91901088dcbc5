"""Sweeps that extend themselves until their best value is bracketed.

A sweep stage with `extend: {axis: lr, max_steps: 3}` is read as sweep lines: its runs that share
every label but `axis`. When every run of a line has finished and the best `metric` sits at an edge
of the line's values, one more run is planned a `factor` (log2 step) beyond that edge; then again,
up to `max_steps` extra runs per line. A line ends `bracketed` (best strictly inside), at its
`limit` (still at an edge after `max_steps`; the report flags the tuned value), or is `waiting` for
runs to finish.

`extend_grid(grid, store)` adds the extension runs the store's records call for (deterministically:
the same records give the same runs and ids) and makes every run tuned from the sweep depend on
them; `waiting_runs(grid, lines)` names the runs that must wait (tuned from a waiting line, and
everything downstream). The launcher re-plans after each round of runs (`pcbench/launch.py`), so a
local run extends its sweeps and then runs what was tuned from them; on SLURM the waiting runs are
submitted by the next `pcbench run` once the sweep's jobs are done.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from pcbench.spec.config import SpecError
from pcbench.grid import expand, label_matches

WAIT = "waits for sweep"  # reason prefix of a held decision


@dataclass
class Line:
    """One sweep line: the runs of `stage` sharing `labels` (every label but the swept axis)."""

    stage: str
    labels: dict
    runs: list = field(default_factory=list)  # Run objects, original and added
    added: list = field(default_factory=list)  # ids of the extension runs
    status: str = "waiting"  # waiting | bracketed | limit
    best: Optional[float] = None  # the best axis value so far
    note: str = ""

    def values(self, axis: str) -> list[float]:
        return sorted(float(r.labels[axis]) for r in self.runs)

    def describe(self) -> str:
        labs = ", ".join(f"{k}={v}" for k, v in self.labels.items())
        return f"{self.stage} [{labs}]: {self.status}" + (f" ({self.note})" if self.note else "")


def _key(labels: dict, axis: str) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in labels.items() if k != axis))


def _metric(store, run_id: str, metric: str) -> Optional[float]:
    """The run's metric (inf when failed or not finite), or None while it is not finished."""
    state = store.state(run_id)
    if state == "failed":
        return math.inf
    if state != "completed":
        return None
    v = (store.final(run_id) or {}).get(metric)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) else math.inf


def _candidates(grid, stage: str, axis: str, value: float) -> dict[tuple, object]:
    """Runs of `stage` at axis value `value`, one per line key, expanded from the grid's own YAML
    (the stage and the stages it starts from or tunes from), so the run is exactly the one the grid
    would make with that value on its axis."""
    need, stack = set(), [stage]
    while stack:
        s = stack.pop()
        if s in need:
            continue
        need.add(s)
        st = grid.stages[s]
        stack += [x for x in (st.source, st.tune.stage if st.tune else None) if x]
    raw = {name: copy.deepcopy(grid.spec.stages[name]) for name in grid.spec.stages if name in need}
    raw[stage]["axes"] = {**raw[stage]["axes"], axis: [value]}
    raw[stage].pop("extend", None)
    sub = expand(dataclasses.replace(grid.spec, stages=raw), grid.source)
    return {_key(r.labels, axis): r for r in sub.runs if r.stage == stage}


def _settle(line: Line, store, ext, cands) -> None:
    """Walk one line forward over the store's records: add extension runs until it is bracketed, at
    its limit, or waiting for a run to finish."""
    axis = ext.axis
    while True:
        scores = [(_metric(store, r.id, ext.metric), float(r.labels[axis])) for r in line.runs]
        if any(m is None for m, _ in scores):
            line.status, line.note = "waiting", "runs to finish"
            return
        finite = [(m, v) for m, v in scores if m < math.inf]
        if not finite:
            line.status, line.note = "limit", f"no finite {ext.metric}"
            return
        best_m, best_v = min(finite)
        vals = sorted(v for _, v in scores)
        line.best = best_v
        if vals[0] < best_v < vals[-1]:
            line.status, line.note = "bracketed", f"best {best_v:g} inside {vals[0]:g}..{vals[-1]:g}"
            return
        if len(line.added) >= ext.max_steps:
            line.status = "limit"
            line.note = (f"best {best_v:g} still at the {'upper' if best_v == vals[-1] else 'lower'} edge of "
                         f"{vals[0]:g}..{vals[-1]:g} after {len(line.added)} extension step(s)")
            return
        nxt = best_v * ext.factor if best_v == vals[-1] else best_v / ext.factor
        run = cands(nxt).get(_key(line.runs[0].labels, axis))
        if run is None:
            line.status, line.note = "limit", f"the grid excludes {axis}={nxt:g}"
            return
        line.runs.append(run)
        line.added.append(run.id)


def extend_grid(grid, store) -> list[Line]:
    """Add to `grid` (in place) the extension runs its sweep stages' records call for, make the runs
    tuned from them depend on them, and return every sweep line with its status."""
    lines: list[Line] = []
    for stage in grid.stage_order():
        ext = grid.stages[stage].extend
        if ext is None:
            continue
        cache: dict[float, dict] = {}

        def cands(value: float, stage=stage, ext=ext) -> dict:
            if value not in cache:
                try:
                    cache[value] = _candidates(grid, stage, ext.axis, value)
                except SpecError:
                    cache[value] = {}
            return cache[value]

        own = [r for r in grid.runs if r.stage == stage]
        added_before = {r.id for r in own if getattr(r, "extension", False)}
        groups: dict[tuple, Line] = {}
        for r in own:
            if r.id in added_before:
                continue
            key = _key(r.labels, ext.axis)
            if key not in groups:
                groups[key] = Line(stage, {k: v for k, v in r.labels.items() if k != ext.axis})
            groups[key].runs.append(r)
        present = {r.id for r in grid.runs}
        new = []
        for line in groups.values():
            _settle(line, store, ext, cands)
            for r in line.runs:
                if r.id in line.added and r.id not in present:
                    r.extension = True
                    new.append(r)
                    present.add(r.id)
            lines.append(line)
        if new:
            at = max(i for i, r in enumerate(grid.runs) if r.stage == stage) + 1
            grid.runs[at:at] = new
        ext_ids = [(rid, line) for line in groups.values() for rid in line.added]
        by_id = grid.by_id()
        for r in grid.runs:
            if r.tune is None or r.tune.stage != stage:
                continue
            for rid, _ in ext_ids:
                a = by_id[rid]
                if rid not in r.deps and all(label_matches(a.labels, k, [r.labels.get(k)]) for k in r.tune.match):
                    r.deps.append(rid)
    return lines


def waiting_runs(grid, lines: list[Line]) -> dict[str, str]:
    """Run id -> why it waits: tuned from a line still waiting, or downstream of such a run."""
    waiting = {}
    for line in lines:
        if line.status != "waiting":
            continue
        members = {r.id for r in line.runs}
        for r in grid.runs:
            if r.tune is not None and r.tune.stage == line.stage and members & set(r.deps):
                waiting.setdefault(r.id, f"{WAIT} `{line.stage}` to be bracketed "
                                         f"({', '.join(f'{k}={v}' for k, v in line.labels.items())})")
    for r in grid.runs:  # dependency order: dependents come after their inputs
        if r.id not in waiting:
            up = next((d for d in r.deps if d in waiting), None)
            if up is not None:
                waiting[r.id] = f"{WAIT}: input {up} waits"
    return waiting


def hold(decisions: list, waiting: dict[str, str]) -> int:
    """Turn the submissions of waiting runs into skips with the reason; return how many."""
    n = 0
    for d in decisions:
        if d.action == "submit" and d.run.id in waiting:
            d.action, d.reason = "skip", waiting[d.run.id]
            n += 1
    return n
