"""Submitting a grid: decide what needs running, then run it locally or submit it through submitit.

- `local`: every run in dependency order, one at a time, each in its own process (a small
  machine is not oversubscribed; a crash cannot take the launcher down).
- `debug`: submitit's debug executor, inline in this process (pdb on failure).
- `slurm`: one job array per stage (per group of runs sharing the same dependencies), with
  `afterok` dependencies on the jobs of the runs they start from; resources from the grid YAML,
  overridable on the command line. Jobs requeue on timeout/preemption and resume from checkpoints.

Re-running a grid skips completed runs and runs already in flight, resumes interrupted ones from
their checkpoints, and reruns failed ones only with `retry_failed`. Liveness is checked, never
assumed (`pcbench/liveness.py`): a `running` run whose process or job is gone is resumed.

Two launchers of one grid can run at once: each run is trained by the one process holding its lock
(`pcbench/jobs.py`); a local launcher waits (with a progress line) for a run or a dependency that
another process is training, and never starts a run before its dependencies are completed.
SIGINT/SIGTERM stop a local launcher after its job has recorded the run `interrupted` (the signal
is forwarded to it): one line, exit code 130/143, and a plain rerun resumes.

The work directory (checkpoints, exports) of a grid is keyed by its results root,
`<work>/<grid>-<hash of the resolved results path>`, so a run into a new `--results` never resumes
from checkpoints that a run into another results dir left (completed records keep pointing at their
own export paths).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pcbench import interrupts, memory, sweep
from pcbench.config import SpecError, to_dict
from pcbench.grid import Grid, Resources, Run, merged_resources, references
from pcbench.liveness import SLURM_ALIVE, Liveness, pid_alive, slurm_states
from pcbench.paths import work_dir
from pcbench.store import Store, brief

EXECUTORS = ("local", "debug", "slurm")


def store_for(grid: Grid, results: Optional[str] = None, work: Optional[str] = None) -> Store:
    """The store of a grid: `<results>/<name>` and `<work>/<name>-<key>` (CLI > grid YAML > defaults),
    the key a hash of the resolved results root: each results dir has its own checkpoints."""
    res_root = Path(results or grid.spec.results_dir or "results")
    work_root = Path(work or grid.spec.work_dir or work_dir())
    key = hashlib.sha256(str(res_root.resolve()).encode()).hexdigest()[:10]
    return Store(res_root / grid.name, work_root / f"{grid.name}-{key}")


def in_flight(status: dict) -> bool:
    """Is a submitted/running run still being worked on by a live job or process? (From a status
    alone; `liveness.Liveness` also checks the run's lock.)"""
    if status.get("state") not in ("submitted", "running"):
        return False
    job = status.get("job_id")
    if status.get("executor") == "slurm" and job:
        return slurm_states([str(job)]).get(str(job)) in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
    pid = status.get("pid")
    if pid and status.get("host") == socket.gethostname():
        return pid_alive(int(pid))
    return False


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
                      "damaged": f"damaged {brief(detail)}: rerun (resumes from its checkpoint)",
                      }.get(state, f"{state}: resume")
            out.append(Decision(run, "submit", reason))
    _rerun_lost_exports(out, store)
    sweep.hold(out, sweep.waiting_runs(grid, lines))
    return out


def _export_missing(store: Store, run_id: str) -> bool:
    path = (store.final(run_id) or {}).get("export_path")
    return not path or not (Path(path) / "config.json").is_file()


def _rerun_lost_exports(decisions: list[Decision], store: Store) -> None:
    """A completed run whose exported model a submitted run loads (`run:<id>`) but which is gone
    (e.g. records from git, work directory cleared) is run again, and so on up its own inputs."""
    by_id = {d.run.id: d for d in decisions}
    for d in reversed(decisions):  # dependents come after their inputs
        if d.action != "submit":
            continue
        loads = {rid for _, rid in references(d.run)}
        for dep in d.run.deps:
            up = by_id.get(dep)
            if (up is not None and up.action == "skip" and up.reason == "completed"
                    and dep in loads and _export_missing(store, dep)):
                up.action, up.reason = "submit", "completed, but its exported model is gone: rerun"


def check_slurm_resources(decisions: list[Decision], override: dict) -> None:
    """Refuse before submitting anything if a SLURM job would lack a required resource."""
    for d in decisions:
        if d.action != "submit":
            continue
        r = merged_resources(d.run, override)
        for f in ("partition", "timeout_min"):
            if getattr(r, f) is None:
                raise SpecError(f"stages.{d.run.stage}.resources.{f}",
                                f"required for --executor slurm (set it in the grid or on the command line)")


def _prepare(store: Store, grid: Grid) -> None:
    store.root.mkdir(parents=True, exist_ok=True)
    if grid.source is not None:
        from pcbench.atomic import write_text

        write_text(store.root / "grid.yaml", Path(grid.source).read_text())
    for run in grid.runs:
        store.write_run(run.record())


@dataclass
class Outcome:
    submitted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)  # stopped by a signal or killed: resumable
    jobs: dict = field(default_factory=dict)  # run id -> submitit job (slurm/debug)
    waiting: int = 0  # runs held until a sweep is bracketed (see pcbench/sweep.py)


def submit(grid: Grid, store: Store, executor: str = "local", *, only: Optional[str] = None,
           retry_failed: bool = False, resources: Optional[dict] = None, progress: Optional[bool] = None,
           log_dir: Optional[Path] = None) -> Outcome:
    """Run or submit what `plan_submission` says; returns what happened. Locally, rounds repeat while
    runs wait for a sweep that the last round's runs may have extended or bracketed."""
    if executor not in EXECUTORS:
        raise SpecError("--executor", f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    total = Outcome()
    while True:  # retry failed runs in the first round only
        out = _submit_round(grid, store, executor, only, retry_failed and not total.submitted, resources,
                            progress, log_dir)
        for f in ("submitted", "failed", "blocked", "interrupted"):
            getattr(total, f).extend(getattr(out, f))
        total.jobs.update(out.jobs)
        total.skipped = [r for r in out.skipped if r not in total.submitted]  # not what an earlier round ran
        total.waiting = out.waiting
        if executor == "slurm" or not out.submitted or not out.waiting:
            if out.waiting:
                print(f"[pcbench] {out.waiting} run(s) wait for a sweep to be bracketed: run this command "
                      "again once the sweep's jobs have finished", file=sys.stderr)
            return total


def _submit_round(grid: Grid, store: Store, executor: str, only: Optional[str], retry_failed: bool,
                  resources: Optional[dict], progress: Optional[bool], log_dir: Optional[Path]) -> Outcome:
    override = resources or {}
    decisions = plan_submission(grid, store, only, retry_failed)
    if executor == "slurm":
        check_slurm_resources(decisions, override)
    memory.check_submission(grid, decisions, override)  # refuse runs whose plan exceeds gpu_mem_gb
    _prepare(store, grid)
    outcome = Outcome(skipped=[d.run.id for d in decisions if d.action == "skip"],
                      waiting=sum(d.reason.startswith(sweep.WAIT) for d in decisions))
    todo = [d.run for d in decisions if d.action == "submit"]
    if not todo:
        return outcome
    log_dir = Path(log_dir or store.work / "logs")
    if executor == "local":
        _run_local(todo, store, outcome, progress)
    else:
        _run_submitit(todo, store, executor, override, log_dir, outcome, progress)
    return outcome


def _say(msg: str) -> None:
    print(f"[pcbench] {msg}", file=sys.stderr, flush=True)


def _run_local(todo: list[Run], store: Store, outcome: Outcome, progress: Optional[bool]) -> None:
    """Each run in its own `python -m pcbench.jobs` process, in order; waits for work another
    process holds; on SIGINT/SIGTERM forwards the signal to the job, then raises `Interrupted`."""
    bad: set[str] = set()  # not completed here: their dependents are blocked
    with interrupts.graceful():
        for k, run in enumerate(todo, 1):
            result, rc = _local_one(run, f"run {k} of {len(todo)}", store, progress, bad)
            getattr(outcome, result).append(run.id)
            if result in ("failed", "interrupted") and rc != 0:  # started here: counted as run too
                outcome.submitted.append(run.id)
            if result != "submitted" and result != "skipped":
                bad.add(run.id)
            if rc > 128 or interrupts.requested():  # a signal asked the job (or us) to stop: stop
                st = store.status(run.id)
                stop = interrupts.Interrupted(interrupts.requested() or rc - 128, st.get("step"))
                stop.run_id = run.id if st.get("state") == "interrupted" else None
                raise stop


def _local_one(run: Run, where: str, store: Store, progress: Optional[bool], bad: set[str]) -> tuple[str, int]:
    """Run one run unless it is done or blocked: (submitted | skipped | failed | blocked | interrupted,
    the job's exit code or 0)."""
    waited_self = False
    while True:
        live = Liveness(store)
        blockers = [d for d in run.deps if d in bad]
        waiting = None
        for d in run.deps:
            if d in bad:
                continue
            state, detail = live.state(d)
            if state in ("submitted", "running"):
                waiting = (d, detail)
            elif state != "completed":
                blockers.append(f"{d} ({state})")
        if blockers:
            _say(f"{run.id}: blocked by {', '.join(blockers)}")
            return "blocked", 0
        if waiting is None:
            state, detail = live.state(run.id, run.kind)
            if state == "completed":
                _say(f"{run.id}: completed by another process: skipped")
                return "skipped", 0
            if state == "failed" and waited_self:
                _say(f"{run.id}: failed under another process: {store.status(run.id).get('error', '')}")
                return "failed", 0
            if state in ("submitted", "running"):
                waiting, waited_self = (run.id, detail), True
        if waiting is not None:
            _wait_for(store, waiting[0], waiting[1], run.id)
            continue
        _say(f"{where}: {run.id} ({_label_str(run)})")
        rc = _call_job(store, run.id, progress)
        from pcbench.jobs import EXIT_ALREADY, EXIT_BUSY, EXIT_OK  # lazily: submitit, once a run starts

        if rc == EXIT_OK:
            return "submitted", rc
        if rc == EXIT_ALREADY:
            return "skipped", rc
        if rc == EXIT_BUSY:  # another process took the run's lock first
            waited_self = True
            time.sleep(0.5)
            continue
        if rc > 128 and store.state(run.id) == "completed":  # recorded before the signal could stop it
            return "submitted", rc
        if interrupts.requested() or rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            return "interrupted", rc if rc > 128 else 128 + (interrupts.requested() or signal.SIGTERM)
        if rc < 0:  # the job was killed (SIGKILL, OOM killer): nothing recorded it
            lock = store.try_lock(run.id, wait_s=0)
            if lock is not None:
                with lock:
                    if store.state(run.id) == "running":
                        store.set_status(run.id, "interrupted", error=f"killed by {signal.Signals(-rc).name}")
            _say(f"{run.id}: its job was killed by {signal.Signals(-rc).name}; a rerun resumes it")
            return "interrupted", rc
        return "failed", rc


def _call_job(store: Store, run_id: str, progress: Optional[bool]) -> int:
    """`python -m pcbench.jobs` for one run; a signal to the launcher is forwarded to it."""
    env = {**os.environ, "PCBENCH_LAUNCHER": "1"}  # the launcher reports an interruption itself
    if progress is not None:
        env["PCBENCH_PROGRESS"] = "1" if progress else "0"
    with interrupts.deferred():
        # The job starts with SIGINT/SIGTERM ignored (no traceback from a signal during its imports)
        # until it installs its own handlers; the signal is forwarded until the job is gone.
        proc = subprocess.Popen([sys.executable, "-m", "pcbench.jobs", str(store.root), str(store.work), run_id],
                                env=env, preexec_fn=_ignore_stop_signals)
        forwarded = 0.0
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                sig = interrupts.requested()
                if sig is not None and time.time() - forwarded > 2:
                    forwarded = time.time()
                    proc.send_signal(sig)  # a repeat changes nothing in a job that has it already


def _ignore_stop_signals() -> None:
    for s in interrupts.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _wait_for(store: Store, run_id: str, detail: Optional[str], for_run: str) -> None:
    """Sleep until `run_id` is no longer in flight, with a progress line every minute."""
    t0, said = time.time(), -1.0
    what = "it" if run_id == for_run else f"its dependency {run_id}"
    while Liveness(store).alive(run_id):
        if time.time() - said >= 60:
            _say(f"{for_run}: waiting for {what}, being run by {detail or 'another process'} "
                 f"({time.time() - t0:.0f}s so far)")
            said = time.time()
        time.sleep(0.5)


def _label_str(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.labels.items())


def _executor(kind: str, log_dir: Path, res: Resources):
    import submitit  # lazily: only a submission pays for it

    ex = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster=kind)
    if kind == "slurm":
        extra = dict(res.slurm_additional)
        params = dict(timeout_min=res.timeout_min, nodes=res.nodes, tasks_per_node=res.tasks,
                      cpus_per_task=res.cpus_per_task, slurm_partition=res.partition,
                      slurm_array_parallelism=res.array_parallelism, slurm_signal_delay_s=60)
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        if res.mem_gb:
            params["mem_gb"] = res.mem_gb
        for key, f in (("slurm_account", "account"), ("slurm_qos", "qos"), ("slurm_constraint", "constraint")):
            if getattr(res, f):
                params[key] = getattr(res, f)
        ex.update_parameters(**params)
        return ex, extra
    return ex, {}


def _run_submitit(todo: list[Run], store: Store, kind: str, override: dict, log_dir: Path,
                  outcome: Outcome, progress: Optional[bool]) -> None:
    from pcbench.jobs import RunJob  # lazily: submitit, only when something is submitted

    job_of: dict[str, str] = {}  # run id -> job id (submitted now or still in flight)
    live = Liveness(store)
    live.prefetch(d for run in todo for d in run.deps)
    groups: dict[tuple, list[Run]] = {}
    for run in todo:
        res = merged_resources(run, override)
        key = json.dumps(to_dict(res), sort_keys=True, default=str)
        groups.setdefault((run.stage, key), []).append(run)
    for (stage, _), runs in groups.items():
        res = merged_resources(runs[0], override)
        # Split further by the jobs the runs must wait for.
        by_deps: dict[tuple, list[Run]] = {}
        for run in runs:
            waits, blockers = [], []
            for d in run.deps:
                if d in outcome.blocked or d in outcome.failed:
                    blockers.append(f"{d} ({'failed' if d in outcome.failed else 'blocked'})")
                elif d in job_of:
                    waits.append(job_of[d])
                else:  # not submitted now: completed, or in flight in a SLURM job to wait for
                    state, detail = live.state(d)
                    st = store.status(d)
                    if state in ("submitted", "running") and kind == "slurm" and st.get("executor") == "slurm":
                        waits.append(str(st["job_id"]))
                    elif state != "completed":
                        blockers.append(f"{d} ({state}{', ' + detail if detail else ''})")
            if blockers:  # never started before its dependencies are completed
                outcome.blocked.append(run.id)
                _say(f"{run.id}: blocked by {', '.join(blockers)}")
                continue
            by_deps.setdefault(tuple(sorted(set(waits))), []).append(run)
        for waits, group in by_deps.items():
            ex, extra = _executor(kind, log_dir, res)
            if waits:
                extra["dependency"] = "afterok:" + ":".join(waits)
                extra["kill-on-invalid-dep"] = "yes"
            if kind == "slurm" and extra:
                ex.update_parameters(slurm_additional_parameters=extra)
            ex.update_parameters(name=f"pcbench-{stage}")
            jobs = []
            if kind == "slurm":
                with ex.batch():
                    for run in group:
                        jobs.append(ex.submit(RunJob(str(store.root), str(store.work), run.id, progress)))
            else:
                jobs = [ex.submit(RunJob(str(store.root), str(store.work), run.id, progress)) for run in group]
            for run, job in zip(group, jobs):
                job_of[run.id] = str(job.job_id)
                outcome.jobs[run.id] = job
                outcome.submitted.append(run.id)
                if kind == "slurm":
                    store.set_status(run.id, "submitted", job_id=str(job.job_id), executor="slurm")
            if kind == "debug":  # debug jobs run when their result is asked for, in order
                for run, job in zip(group, jobs):
                    try:
                        job.result()
                    except Exception:  # noqa: BLE001 - recorded in the store
                        outcome.failed.append(run.id)


def wait_for_jobs(outcome: Outcome, store: Store, poll_s: float = 3.0) -> None:
    """Wait for the SLURM jobs of `outcome`, then make its counts the truth: a run whose job failed
    is counted failed; one SLURM cancelled because a dependency failed (`afterok`) is recorded
    `cancelled` and counted blocked; one whose job ended without recording it is recorded
    `interrupted` (a rerun resumes it). A progress line whenever the counts change (or each minute)."""
    pending = {rid: str(job.job_id) for rid, job in outcome.jobs.items()}
    said, last = 0.0, None
    while pending:
        states = slurm_states(pending.values())
        for rid, job in list(pending.items()):
            js = states.get(job)
            if js in SLURM_ALIVE or (js is None and store.state(rid) in ("submitted", "running")):
                continue
            del pending[rid]
            _settle(rid, job, js or "UNKNOWN", store, outcome)
        counts = (len(outcome.jobs) - len(pending), len(pending))
        if pending and (counts != last or time.time() - said >= 60):
            _say(f"waiting for {counts[1]} SLURM job(s); {counts[0]} of {len(outcome.jobs)} done")
            said, last = time.time(), counts
        if pending:
            time.sleep(poll_s)


def _settle(rid: str, job: str, slurm_state: str, store: Store, outcome: Outcome) -> None:
    for _ in range(20):  # the job's last status write may trail its end in accounting by a moment
        state = store.state(rid)
        if state not in ("submitted", "running"):
            break
        time.sleep(0.25)
    if state == "completed":
        return
    if state == "failed":
        outcome.failed.append(rid)
        return
    failed_deps = [d for d in (store.run(rid).get("deps") or [])
                   if store.state(d) in ("failed", "cancelled", "interrupted")]
    if state in ("submitted", "running", "cancelled") and slurm_state == "CANCELLED" and failed_deps:
        store.set_status(rid, "cancelled", job_id=job,
                         error=f"SLURM cancelled job {job}: its dependency {', '.join(failed_deps)} did not complete")
        outcome.blocked.append(rid)
        outcome.submitted.remove(rid)  # never ran
        return
    if state in ("submitted", "running"):
        store.set_status(rid, "cancelled" if slurm_state == "CANCELLED" else "interrupted", job_id=job,
                         error=f"SLURM job {job} ended {slurm_state} before the run was recorded")
    outcome.interrupted.append(rid)
