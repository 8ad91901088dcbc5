"""Submitting a grid: decide what needs running, then hand it to an executor (`pcbench/executors`:
`local` runs each run in its own process of this launcher, `debug` inline through submitit, `slurm`
as SLURM job arrays through submitit).

Re-running a grid skips completed runs and runs already in flight, resumes interrupted ones from
their checkpoints, and reruns failed ones only with `retry_failed`. Liveness is checked, never
assumed (`pcbench/liveness.py`): a `running` run whose process or job is gone is resumed.

Two launchers of one grid can run at once: each run is trained by the one process holding its lock
(`pcbench/jobs.py`); a local launcher waits (with a progress line) for a run or a dependency that
another process is training, and never starts a run before its dependencies are completed.
SIGINT/SIGTERM/SIGHUP/SIGQUIT stop a local launcher after its job has recorded the run `interrupted` (the signal
is forwarded to it): one line, exit code 130/143, and a plain rerun resumes.

The work directory (checkpoints, exports) of a grid is keyed by its results root,
`<work>/<grid>-<hash of the resolved results path>`, so a run into a new `--results` never resumes
from checkpoints that a run into another results dir left (completed records keep pointing at their
own export paths).
"""

from __future__ import annotations

import glob
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pcbench.train import memory

from pcbench.run import sweep
from pcbench.run.executors import EXECUTORS, Executor, Outcome, named  # noqa: F401 (EXECUTORS, Outcome re-exported)
from pcbench.run.executors.local import LOCAL_MODES, _ForkServer, _wait_for, local_mode, local_parallel  # noqa: F401
from pcbench.grid import Grid, Run, merged_resources, references  # noqa: F401 (merged_resources re-exported)
from pcbench.run.liveness import Liveness
from pcbench.util.paths import work_dir
from pcbench.store import Store, brief


def store_for(grid: Grid, results: Optional[str] = None, work: Optional[str] = None) -> Store:
    """The store of a grid: `<results>/<name>` and `<work>/<name>-<key>` (CLI > grid YAML > defaults),
    the key a hash of the resolved results root: each results dir has its own checkpoints."""
    res_root = Path(results or grid.spec.results_dir or "results")
    work_root = Path(work or grid.spec.work_dir or work_dir())
    key = hashlib.sha256(str(res_root.resolve()).encode()).hexdigest()[:10]
    return Store(res_root / grid.name, work_root / f"{grid.name}-{key}")


@dataclass
class Decision:
    run: Run
    action: str  # submit | skip
    reason: str


def plan_submission(grid: Grid, store: Store, only: Optional[str] = None,
                    retry_failed: bool = False) -> list[Decision]:
    """What to do with each selected run, without doing it. Sweeps with `extend` first gain the
    extension runs their records call for; runs tuned from a sweep still being extended wait."""
    lines = sweep.extend_grid(grid, store)
    for line in lines:
        if line.status == "limit":
            print(f"[pcbench] sweep {line.describe()}: the tuned value is not bracketed", file=sys.stderr)
    out = []
    selected = grid.select(only)
    live = Liveness(store)
    live.prefetch(r.id for r in selected)
    for run in selected:
        state, detail = live.state(run.id, run.kind)
        if state == "completed":
            out.append(Decision(run, "skip", "completed"))
        elif state == "failed" and not retry_failed:
            out.append(Decision(run, "skip", "failed (use --retry-failed)"))
        elif state in ("submitted", "running"):
            out.append(Decision(run, "skip", f"in flight ({detail})"))
        else:
            reason = {"pending": "new", "failed": "retry", "interrupted": "interrupted: resume",
                      "cancelled": f"cancelled ({detail or 'SLURM'}): resume",
                      "lost": f"lost ({detail}): resume",
                      "damaged": f"damaged {brief(detail)}: rerun (resumes from its checkpoint if its records own it)",
                      }.get(state, f"{state}: resume")
            if reason.endswith("resume") and _state_elsewhere(store, run.id):
                reason = f"{state}: starts over (its work state is under another results path)"
            out.append(Decision(run, "submit", reason))
    _recheck_stale(out, store, {r.id: r.stage for r in grid.runs})
    _rerun_lost_exports(out, store)
    sweep.hold(out, sweep.waiting_runs(grid, lines))
    return out


def _recheck_stale(decisions: list[Decision], store: Store, stages: dict[str, str]) -> None:
    """Completed runs whose result no longer follows from their inputs (`run.stale`) are run again:
    a tuned run whose tuned-from runs now give another best value; and, after such a run, every
    completed run that loads its model or is tuned from it (its job checks the digests first). A
    completed tuned run with tuned-from runs still to run waits for them (a sweep edited to try more
    values), then is checked in the next round."""
    from pcbench.run import stale

    runs: set[str] = set()  # submitted in this plan
    again: set[str] = set()  # completed, run again because an input changed
    for d in decisions:  # inputs before their dependents
        if d.action == "submit":
            runs.add(d.run.id)
        if d.action != "skip" or d.reason != "completed":
            continue
        record = d.run.record()  # the grid's (a sweep edited since the run gains runs)
        todo = [rid for rid in stale.tuned_from(record, store, stages.get) if rid in runs]
        change = None if todo else stale.tuned_change(record, store, stage_of=stages.get)
        up = next((dep for dep in d.run.deps if dep in again), None)
        if todo and up is None:
            d.reason = (f"{sweep.WAIT} runs {', '.join(todo[:3])}{' ...' if len(todo) > 3 else ''} to "
                        "complete: completed, its tuned value is checked again then")
            continue
        if change is None and up is None:
            continue
        d.action = "submit"
        d.reason = (f"completed, but {change}: rerun" if change else
                    f"completed, but its input {up} runs again: rerun after it unless its model is the same")
        runs.add(d.run.id)
        again.add(d.run.id)


def _state_elsewhere(store: Store, run_id: str) -> bool:
    """A run to resume with no work state here, whose records' lineage owns state in the work dir of
    another results path (the results dir was moved or copied: the work key hashes its path): it
    starts over, said in one warning line (by `run` and its `--dry-run` alike)."""
    from pcbench.store import read_record
    from pcbench.util.verify import warn

    here = store.paths(run_id).work
    lineage = store.status(run_id).get("lineage")
    if store.work is None or lineage is None or here.exists():
        return False
    for owner in sorted(store.work.parent.glob(f"{glob.escape(store.root.name)}-*/{glob.escape(run_id)}/owner.json")):
        if (read_record(owner) or {}).get("lineage") == lineage:
            warn(f"{run_id}: its work state is at {owner.parent}, made for another results path "
                 f"(the work dir is keyed by the results path), not at {here}: the run starts over from step 0")
            return True
    return False


def _rerun_lost_exports(decisions: list[Decision], store: Store) -> None:
    """A completed run whose exported model a submitted run loads (`run:<id>`) but which is gone
    (e.g. records from git, work directory cleared) is run again, and so on up its own inputs. So
    is any completed train run (a leaf too) whose export, made in this store's work directory, is
    gone or damaged there (records from elsewhere, with no export here, are kept as they are)."""
    from pcbench.run import stale

    by_id = {d.run.id: d for d in decisions}
    for d in decisions:
        if d.action == "skip" and d.reason == "completed" and d.run.kind == "train":
            final = store.final(d.run.id)
            if store.export_here(final):
                what = stale.export_lost(store, d.run.id)
                if what is not None:
                    d.action, d.reason = "submit", f"completed, but its exported model is {what}: rerun"
    for d in reversed(decisions):  # dependents come after their inputs
        if d.action != "submit":
            continue
        loads = {rid for _, rid in references(d.run)}
        for dep in d.run.deps:
            up = by_id.get(dep)
            if up is not None and up.action == "skip" and up.reason == "completed" and dep in loads:
                what = stale.export_lost(store, dep)
                if what is not None:
                    up.action, up.reason = "submit", f"completed, but its exported model is {what}: rerun"


def _renew_records(store: Store, decisions: list[Decision]) -> None:
    """A completed run submitted again whose dependencies the grid changed (a sweep edited to try
    more values, `_recheck_stale`) is recorded pending, then gets the grid's record of it: its job
    tunes it from them. (A completed run's record is sealed by its status, so the status goes first.)"""
    for d in decisions:
        if d.action == "submit" and store.state(d.run.id) == "completed" and \
                store.run(d.run.id).get("deps") != d.run.deps:
            store.set_status(d.run.id, "pending", reason=d.reason)
            store.write_run(d.run.record())


def _prepare(store: Store, grid: Grid) -> None:
    store.root.mkdir(parents=True, exist_ok=True)
    if grid.source is not None:
        from pcbench.util.atomic import write_text

        write_text(store.root / "grid.yaml", Path(grid.source).read_text())
    store.write_grid_runs([r.id for r in grid.runs])  # a report counts only these (not an earlier grid's)
    for run in grid.runs:
        # A completed run keeps the record it ran with: its id hashes the spec's non-default fields,
        # so a newer pcbench would only add fields at their defaults (and churn committed records).
        # A damaged one (e.g. its run.json unreadable or not as sealed) is rerun: rewritten.
        if store.health(run.id, run.kind)[0] != "completed":
            store.write_run(run.record())


def submit(grid: Grid, store: Store, executor: str = "local", *, only: Optional[str] = None,
           retry_failed: bool = False, resources: Optional[dict] = None, progress: Optional[bool] = None,
           log_dir: Optional[Path] = None, parallel: Optional[int] = None, prepare: bool = True,
           workers: Optional[int] = None) -> Outcome:
    """Run or submit what `plan_submission` says; returns what happened. Locally, rounds repeat while
    runs wait for a sweep that the last round's runs may have extended or bracketed. `parallel`:
    local runs at once (default: `local_parallel`)."""
    ex = named(executor)
    total = Outcome()
    while True:  # retry failed runs in the first round only
        out = _submit_round(grid, store, ex, only, retry_failed and not total.submitted, resources,
                            progress, log_dir, parallel, prepare, workers)
        for f in ("submitted", "failed", "blocked", "interrupted"):
            getattr(total, f).extend(getattr(out, f))
        total.jobs.update(out.jobs)
        total.skipped = [r for r in out.skipped if r not in total.submitted]  # not what an earlier round ran
        total.waiting = out.waiting
        if ex.submits or not out.submitted or not out.waiting:
            if out.waiting:
                print(f"[pcbench] {out.waiting} run(s) wait for a sweep to be bracketed: run this command "
                      "again once the sweep's jobs have finished", file=sys.stderr)
            return total


def _submit_round(grid: Grid, store: Store, ex: Executor, only: Optional[str], retry_failed: bool,
                  resources: Optional[dict], progress: Optional[bool], log_dir: Optional[Path],
                  parallel: Optional[int] = None, prepare: bool = True,
                  workers: Optional[int] = None) -> Outcome:
    override = resources or {}
    decisions = plan_submission(grid, store, only, retry_failed)
    ex.check(decisions, override)  # e.g. SLURM resources every job needs
    memory.check_submission(grid, decisions, override)  # refuse runs whose plan exceeds gpu_mem_gb
    _prepare(store, grid)
    _renew_records(store, decisions)
    outcome = Outcome(skipped=[d.run.id for d in decisions if d.action == "skip"],
                      waiting=sum(d.reason.startswith(sweep.WAIT) for d in decisions))
    todo = [d.run for d in decisions if d.action == "submit"]
    if not todo:
        return outcome
    log_dir = Path(log_dir or store.work / "logs")
    if prepare:  # what the jobs would fetch, first (they run with the hub offline): a fetch that
        from pcbench.run.prepare import fetch_for_jobs  # fails leaves nothing submitted

        fetch_for_jobs(grid, todo)
    if prepare and ex.name == "slurm":  # the prepare stage as SLURM jobs; training waits (afterok)
        from pcbench.run.prepare import submit_slurm

        ex.after = submit_slurm(grid, todo, log_dir, override)
    elif prepare:  # the prepare stage here: every store the jobs read, before the first job
        from pcbench.run.prepare import prepare_grid

        prepare_grid(grid, todo, workers=workers)
    if prepare:
        from pcbench.run.prepare import offline_jobs

        with offline_jobs():
            ex.run(todo, store, outcome, override=override, log_dir=log_dir, progress=progress, parallel=parallel)
        return outcome
    ex.run(todo, store, outcome, override=override, log_dir=log_dir, progress=progress, parallel=parallel)
    return outcome
