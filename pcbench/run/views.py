"""The CLI's tables of a grid: `status` (each run's state, loss or score, error) and `run --dry-run`
(each run's action, resources, GPU-hours and planned memory). Plain text through `report.fmt`;
neither pandas nor torch is imported, so `pcbench status` starts at once."""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional

from pcbench.report import fmt


def status_table(grid, store, only: Optional[str] = None) -> str:
    """One row per selected run (state after a liveness check), then the count of each state."""
    return status_view(grid, store, only)[0]


def status_view(grid, store, only: Optional[str] = None) -> tuple[str, Counter]:
    """`status_table`'s text and the count of each state (`pcbench status --watch` stops on them)."""
    from pcbench.run.liveness import Liveness
    from pcbench.store import brief
    from pcbench.run.sweep import extend_grid

    rows = []
    extend_grid(grid, store)  # the extension runs its sweeps' records have added
    runs = grid.select(only)
    live = Liveness(store)  # running/submitted only while its process or job is alive
    live.prefetch(r.id for r in runs)
    for run in runs:
        st = store.status(run.id)
        state, detail = live.state(run.id, run.kind)
        ok = state != "damaged"  # a damaged run's records are never read as data
        final = (store.final(run.id) if ok else None) or {}
        ev = (store.eval_result(run.id) if ok else None) or {}
        row = {"run": run.id, **run.labels, "state": state}
        if run.kind == "train":
            loss = final.get("train_loss_last100")
            row["loss"] = None if loss is None or (isinstance(loss, float) and math.isnan(loss)) else round(loss, 4)
            row["heldout"] = None if final.get("heldout_loss") is None else round(final["heldout_loss"], 4)
        elif ev:
            avg = ev.get("average")
            row["score"] = None if avg is None else round(avg, 4)
        if state in ("failed", "interrupted", "cancelled"):
            row["error"] = (st.get("error") or "")[:80]
        elif state == "lost":
            row["error"] = detail
        elif state == "damaged":
            row["error"] = brief(detail)[:80]
        rows.append(row)
    counts = Counter(r["state"] for r in rows)
    return fmt.text_table(rows) + "\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), counts


def dry_run_table(grid, store, only, retry_failed, override, executor) -> str:
    """What `run` would do with each selected run, the GPU-hours to submit, and the runs whose
    memory plan exceeds the GPU memory asked (refused on submission)."""
    from pcbench.train import memory
    from pcbench.run.launch import merged_resources, plan_submission

    rows, resolve, over = [], memory.grid_resolver(grid), []
    for d in plan_submission(grid, store, only, retry_failed):
        r = merged_resources(d.run, override)
        mp = memory.run_plan(d.run, r, resolve)  # predicted peak per GPU (process)
        over += memory.over_limit([d.run], lambda _: r, resolve) if d.action == "submit" else []
        spec = d.run.spec
        row = {"run": d.run.id, "stage": d.run.stage, **d.run.labels, "action": d.action,
               "why": d.reason, "gpus": r.nodes * r.gpus_per_node, "hours": d.run.hours,
               "gpu_hours": r.gpu_hours(d.run.hours), "partition": r.partition, "time_min": r.timeout_min}
        if d.run.kind == "train":
            t = spec.train
            row["tokens"] = t.tokens if t.tokens is not None else t.steps * t.batch_size * spec.data.seq_len
            row["batch"] = f"{spec.data.seq_len}x{t.batch_size}"
        row["GB/GPU"] = "-" if mp is None else f"{mp.gb:.1f}"
        rows.append(row)
    per_stage = Counter(r["run"].rsplit("-", 1)[0] for r in rows)  # in order of first appearance
    shown = [{**r, "hours": f"{r['hours']:.2f}", "gpu_hours": f"{r['gpu_hours']:.1f}"} for r in rows]
    lines = [f"grid {grid.name}: {len(rows)} runs ({', '.join(f'{s}: {n}' for s, n in per_stage.items())})",
             fmt.text_table(shown)]
    todo = [r["gpu_hours"] for r in rows if r["action"] == "submit"]
    lines.append(f"to submit: {len(todo)} runs, {math.fsum(todo):,.0f} GPU-hours estimated "
                 f"({math.fsum(r['gpu_hours'] for r in rows):,.0f} for the whole grid)")
    lines += [f"over the GPU memory asked, refused on submission: {m}" for m in over]
    lines += _prepare_lines(grid, [d.run for d in plan_submission(grid, store, only, retry_failed)
                                   if d.action == "submit"])
    return "\n".join(lines)


def _prepare_lines(grid, todo) -> list[str]:
    """The prepare stage: each token store the runs to submit read (built first by `pcbench run`)."""
    from pcbench.run.prepare import estimate, grid_stores, store_rows

    rows = store_rows(grid, todo)
    if not rows:
        return []
    return ["prepare stage (token stores, built before the first training job; `pcbench prepare GRID`):",
            fmt.text_table(rows),
            f"to prepare: {sum(r['prepared'] != 'yes' for r in rows)} of {len(rows)} stores, "
            f"{estimate(grid_stores(grid, todo)):,.1f} core-hours estimated from nothing"]
