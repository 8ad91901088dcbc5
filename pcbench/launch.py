"""Submitting a grid: decide what needs running, then run it locally or submit it through submitit.

- `local`: every run in dependency order, one at a time, each in its own process (a small
  machine is not oversubscribed; a crash cannot take the launcher down).
- `debug`: submitit's debug executor, inline in this process (pdb on failure).
- `slurm`: one job array per stage (per group of runs sharing the same dependencies), with
  `afterok` dependencies on the jobs of the runs they start from; resources from the grid YAML,
  overridable on the command line. Jobs requeue on timeout/preemption and resume from checkpoints.

Re-running a grid skips completed runs and runs already in flight, resumes interrupted ones from
their checkpoints, and reruns failed ones only with `retry_failed`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import submitit

from pcbench import sweep
from pcbench.config import SpecError, to_dict
from pcbench.grid import Grid, Resources, Run
from pcbench.jobs import RunJob
from pcbench.paths import work_dir
from pcbench.store import Store

EXECUTORS = ("local", "debug", "slurm")


def store_for(grid: Grid, results: Optional[str] = None, work: Optional[str] = None) -> Store:
    """The store of a grid: `<results>/<name>` and `<work>/<name>` (CLI > grid YAML > defaults)."""
    res_root = Path(results or grid.spec.results_dir or "results")
    work_root = Path(work or grid.spec.work_dir or work_dir())
    return Store(res_root / grid.name, work_root / grid.name)


def _slurm_alive(job_id: str) -> bool:
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() != ""


def in_flight(status: dict) -> bool:
    """Is a submitted/running run still being worked on by a live job or process?"""
    if status.get("state") not in ("submitted", "running"):
        return False
    job = status.get("job_id")
    if status.get("executor") == "slurm" and job:
        return _slurm_alive(str(job))
    pid = status.get("pid")
    if pid and status.get("host") == socket.gethostname():
        return _pid_alive(int(pid))
    return False


def _pid_alive(pid: int) -> bool:
    """A live (not zombie) process with this pid."""
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: trust kill(0)


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
    for run in grid.select(only):
        st = store.status(run.id)
        state = st.get("state", "pending")
        if state == "completed":
            out.append(Decision(run, "skip", "completed"))
        elif state == "failed" and not retry_failed:
            out.append(Decision(run, "skip", "failed (use --retry-failed)"))
        elif state in ("submitted", "running") and in_flight(st):
            out.append(Decision(run, "skip", f"in flight (job {st.get('job_id') or st.get('pid')})"))
        else:
            reason = {"pending": "new", "failed": "retry"}.get(state, "interrupted: resume")
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
        spec = json.dumps(to_dict(d.run.spec))
        for dep in d.run.deps:
            up = by_id.get(dep)
            if (up is not None and up.action == "skip" and up.reason == "completed"
                    and f'"run:{dep}"' in spec and _export_missing(store, dep)):
                up.action, up.reason = "submit", "completed, but its exported model is gone: rerun"


def merged_resources(run: Run, override: dict) -> Resources:
    return dataclasses.replace(run.resources, **{k: v for k, v in override.items() if v is not None})


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
        for f in ("submitted", "failed", "blocked"):
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


def _run_local(todo: list[Run], store: Store, outcome: Outcome, progress: Optional[bool]) -> None:
    bad: set[str] = set()
    for run in todo:
        blockers = [d for d in run.deps if d in bad or store.state(d) == "failed"]
        if blockers:
            bad.add(run.id)
            outcome.blocked.append(run.id)
            print(f"[pcbench] {run.id}: blocked by failed {', '.join(blockers)}", file=sys.stderr)
            continue
        print(f"[pcbench] {run.id} ({_label_str(run)})", file=sys.stderr, flush=True)
        env = dict(os.environ)
        if progress is not None:
            env["PCBENCH_PROGRESS"] = "1" if progress else "0"
        rc = subprocess.call([sys.executable, "-m", "pcbench.jobs", str(store.root), str(store.work), run.id],
                             env=env)
        outcome.submitted.append(run.id)
        if rc != 0:
            bad.add(run.id)
            outcome.failed.append(run.id)


def _label_str(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.labels.items())


def _executor(kind: str, log_dir: Path, res: Resources):
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
    job_of: dict[str, str] = {}  # run id -> job id (submitted now or still in flight)
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
            waits = []
            for d in run.deps:
                if d in job_of:
                    waits.append(job_of[d])
                else:
                    st = store.status(d)
                    if st.get("state") != "completed" and st.get("job_id") and kind == "slurm":
                        waits.append(str(st["job_id"]))
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
