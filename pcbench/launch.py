"""Submitting a grid: decide what needs running, then run it locally or submit it through submitit.

- `local`: every run in dependency order, each in its own process (a crash cannot take the launcher
  down): a fork of one pre-imported server (`pcbench/forkserver.py`: torch/transformers/lm-eval
  imported once), or a fresh `python -m pcbench.jobs` with `PCBENCH_LOCAL_MODE=subprocess`. Up to
  `--parallel N` runs at once (default 1; `auto`: as many as fit the cores at the threads the runs
  ask for, so each run keeps its thread count: the same losses), each started once its
  dependencies are completed.
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

import atexit
import hashlib
import json
import os
import select
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
           log_dir: Optional[Path] = None, parallel: Optional[int] = None) -> Outcome:
    """Run or submit what `plan_submission` says; returns what happened. Locally, rounds repeat while
    runs wait for a sweep that the last round's runs may have extended or bracketed. `parallel`:
    local runs at once (default: `local_parallel`)."""
    if executor not in EXECUTORS:
        raise SpecError("--executor", f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    total = Outcome()
    while True:  # retry failed runs in the first round only
        out = _submit_round(grid, store, executor, only, retry_failed and not total.submitted, resources,
                            progress, log_dir, parallel)
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
                  resources: Optional[dict], progress: Optional[bool], log_dir: Optional[Path],
                  parallel: Optional[int] = None) -> Outcome:
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
        _run_local(todo, store, outcome, progress, parallel)
    else:
        _run_submitit(todo, store, executor, override, log_dir, outcome, progress)
    return outcome


def _say(msg: str) -> None:
    print(f"[pcbench] {msg}", file=sys.stderr, flush=True)


LOCAL_MODES = ("fork", "subprocess")


def local_mode() -> str:
    """How the local executor starts a run: `fork` (default: a child of this pre-imported launcher)
    or `subprocess` (a fresh `python -m pcbench.jobs`, for debugging), from `PCBENCH_LOCAL_MODE`."""
    mode = os.environ.get("PCBENCH_LOCAL_MODE", "fork").strip() or "fork"
    if mode not in LOCAL_MODES:
        raise SpecError("PCBENCH_LOCAL_MODE", f"unknown mode {mode!r}; choose from {', '.join(LOCAL_MODES)}")
    return mode if hasattr(os, "fork") else "subprocess"


def local_parallel(todo: list[Run], parallel: Optional[int | str] = None) -> int:
    """How many local runs at once: `parallel` (else `PCBENCH_PARALLEL`, else 1); `auto`: as many
    as fit the cores at the largest thread count a run asks for (a run without one takes every
    core), so each run keeps its own thread count and the machine is not oversubscribed."""
    if parallel is None:
        parallel = os.environ.get("PCBENCH_PARALLEL") or 1
    if parallel == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = [_threads(run) or cores for run in todo]
        return max(1, cores // max(threads)) if threads else 1
    try:
        n = int(parallel)
    except ValueError:
        raise SpecError("PCBENCH_PARALLEL", f"must be an integer or auto, not {parallel!r}") from None
    if n < 1:
        raise SpecError("--parallel", f"must be at least 1, not {n}")
    return n


def _threads(run: Run) -> Optional[int]:
    part = getattr(run.spec, "train", None) if run.kind == "train" else run.spec
    return getattr(part, "threads", None)


def _run_local(todo: list[Run], store: Store, outcome: Outcome, progress: Optional[bool],
               parallel: Optional[int] = None) -> None:
    """Each run in its own process (a fork of this launcher, or `python -m pcbench.jobs`), in order,
    up to `local_parallel` at once; waits for work another process holds; on SIGINT/SIGTERM forwards
    the signal to the jobs, then raises `Interrupted`."""
    local_mode()  # a bad PCBENCH_LOCAL_MODE is refused before any run
    n = local_parallel(todo, parallel)
    if n > 1:
        _run_parallel(todo, store, outcome, progress, n)
        return
    bad: set[str] = set()  # not completed here: their dependents are blocked
    with interrupts.graceful():
        for k, run in enumerate(todo, 1):
            result, rc = _local_one(run, f"run {k} of {len(todo)}", store, progress, bad)
            _count(outcome, bad, run, result, rc)
            if rc > 128 or interrupts.requested():  # a signal asked the job (or us) to stop: stop
                _stop(store, run.id, rc)


def _count(outcome: Outcome, bad: set[str], run: Run, result: str, rc: int) -> None:
    getattr(outcome, result).append(run.id)
    if result in ("failed", "interrupted") and rc != 0:  # started here: counted as run too
        outcome.submitted.append(run.id)
    if result != "submitted" and result != "skipped":
        bad.add(run.id)


def _stop(store: Store, run_id: Optional[str], rc: int) -> None:
    st = store.status(run_id) if run_id else {}
    stop = interrupts.Interrupted(interrupts.requested() or rc - 128, st.get("step"))
    stop.run_id = run_id if st.get("state") == "interrupted" else None
    raise stop


def _check(run: Run, store: Store, bad: set[str], waited_self: bool):
    """Before starting `run`: ("blocked" | "skipped" | "failed", 0) to finish it, ("wait", (id,
    detail)) while it or a dependency is in flight elsewhere, or None to start it."""
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
            waiting = (run.id, detail)
    return ("wait", waiting) if waiting is not None else None


def _local_one(run: Run, where: str, store: Store, progress: Optional[bool], bad: set[str]) -> tuple[str, int]:
    """Run one run unless it is done or blocked: (submitted | skipped | failed | blocked | interrupted,
    the job's exit code or 0)."""
    waited_self = False
    while True:
        check = _check(run, store, bad, waited_self)
        if check is not None and check[0] != "wait":
            return check
        if check is not None:
            waited_self = waited_self or check[1][0] == run.id
            _wait_for(store, check[1][0], check[1][1], run.id)
            continue
        _say(f"{where}: {run.id} ({_label_str(run)})")
        job = _start_job(store, run.id, progress)
        with interrupts.deferred():
            while (rc := job.poll()) is None:
                job.forward(interrupts.requested())
                time.sleep(0.2)
        result = _result_of(run, rc, store)
        if result is None:  # another process took the run's lock first
            waited_self = True
            time.sleep(0.5)
            continue
        return result


def _result_of(run: Run, rc: int, store: Store) -> Optional[tuple[str, int]]:
    """What a job's exit code `rc` means for `run` (None: another process held its lock)."""
    from pcbench.jobs import EXIT_ALREADY, EXIT_BUSY, EXIT_OK  # lazily: submitit, once a run starts

    if rc == EXIT_OK:
        return "submitted", rc
    if rc == EXIT_ALREADY:
        return "skipped", rc
    if rc == EXIT_BUSY:
        return None
    if rc > 128 and store.state(run.id) == "completed":  # recorded before the signal could stop it
        return "submitted", rc
    if interrupts.requested() or rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return "interrupted", rc if rc > 128 else 128 + (interrupts.requested() or signal.SIGTERM)
    if rc < 0:  # the job was killed (SIGKILL, OOM killer, a segfault): nothing recorded it
        _record_unrecorded(run.id, store, "interrupted", f"killed by {signal.Signals(-rc).name}")
        _say(f"{run.id}: its job was killed by {signal.Signals(-rc).name}; a rerun resumes it")
        return "interrupted", rc
    _record_unrecorded(run.id, store, "failed", f"its job exited with code {rc} without recording the run")
    return "failed", rc


def _record_unrecorded(run_id: str, store: Store, state: str, error: str) -> None:
    """A job that ended without recording its run (left `running`) is recorded `state` here."""
    lock = store.try_lock(run_id, wait_s=0)
    if lock is not None:
        with lock:
            if store.state(run_id) == "running":
                store.set_status(run_id, state, error=error)


def _run_parallel(todo: list[Run], store: Store, outcome: Outcome, progress: Optional[bool], n: int) -> None:
    """Up to `n` runs at once, each started (in `todo`'s order) once its dependencies are completed;
    after a signal no run starts, the running ones are stopped (signal forwarded) and awaited."""
    bad: set[str] = set()
    pending, running, waited_self = list(todo), {}, set()  # running: run id -> (run, job)
    started, said = 0, {}  # said: run id -> when its waiting line was last printed
    stop_rc, stopped_run = 0, None
    with interrupts.graceful():
        with interrupts.deferred():
            while pending or running:
                stopping = interrupts.requested() or stop_rc  # a signal to us or to a job: start nothing
                for run in list(pending) if not stopping else []:
                    if len(running) >= n:
                        break
                    if any(d in running or d in {p.id for p in pending} for d in run.deps):
                        continue  # an input of this launcher is not done yet
                    check = _check(run, store, bad, run.id in waited_self)
                    if check is not None and check[0] == "wait":
                        if check[1][0] == run.id:
                            waited_self.add(run.id)
                        if time.time() - said.get(run.id, 0) >= 60:
                            what = "it" if check[1][0] == run.id else f"its dependency {check[1][0]}"
                            _say(f"{run.id}: waiting for {what}, being run by {check[1][1] or 'another process'}")
                            said[run.id] = time.time()
                        continue
                    pending.remove(run)
                    if check is not None:
                        _count(outcome, bad, run, *check)
                        continue
                    started += 1
                    _say(f"run {started} of {len(todo)}: {run.id} ({_label_str(run)})")
                    running[run.id] = (run, _start_job(store, run.id, progress))
                for rid, (run, job) in list(running.items()):
                    job.forward(interrupts.requested())
                    rc = job.poll()
                    if rc is None:
                        continue
                    del running[rid]
                    result = _result_of(run, rc, store)
                    if result is None:  # another process took the run's lock first: wait for it
                        waited_self.add(rid)
                        pending.insert(0, run)
                        started -= 1
                        continue
                    _count(outcome, bad, run, *result)
                    if rc > 128 or interrupts.requested():
                        stop_rc = max(stop_rc, rc)
                        if result[0] == "interrupted" and stopped_run is None:
                            stopped_run = rid
                if (interrupts.requested() or stop_rc) and not running:
                    break
                time.sleep(0.1 if running else 0.5)
        if stop_rc > 128 or interrupts.requested():
            _stop(store, stopped_run, stop_rc or 128 + (interrupts.requested() or signal.SIGTERM))


class _Job:
    """One run's process: `poll()` its exit code (negative: killed by that signal, as subprocess
    reports it), `forward(sig)` a signal the launcher received (again at most every 2 s)."""

    def __init__(self, pid: int, proc: Optional[subprocess.Popen] = None):
        self.pid, self.proc, self.rc, self._forwarded = pid, proc, None, 0.0

    def poll(self) -> Optional[int]:
        if self.rc is None:
            self.rc = self.proc.poll() if self.proc is not None else _server.exit_code(self.pid)
        return self.rc

    def forward(self, sig: Optional[int]) -> None:
        if sig is not None and self.rc is None and time.time() - self._forwarded > 2:
            self._forwarded = time.time()
            try:
                os.kill(self.pid, sig)  # a repeat changes nothing in a job that has it already
            except ProcessLookupError:
                pass


class _ForkServer:
    """The launcher's end of `pcbench/forkserver.py`, started on the first local run (imports paid
    once, there) and kept for this process; closed when the launcher exits."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.cmd = self.reply = -1
        self.buf, self.exits, self.broken, self.last = b"", {}, False, {}

    def start(self, args: list[str], env: dict) -> Optional[int]:
        """The pid of a forked child running `pcbench.jobs.main(args)`, None if no server runs."""
        if self.proc is None and not self.broken:
            self._spawn()
        if self.broken:
            return None
        self._send({"args": args, "env": env, "cwd": os.getcwd()})
        return self._wait_for("pid")

    def exit_code(self, pid: int) -> Optional[int]:
        while pid not in self.exits:
            msg = self._read(0)
            if msg is None:
                break
        if pid in self.exits:
            return self.exits.pop(pid)
        if self.broken and not pid_alive(pid):  # the server died: the child's status is lost with it
            _say(f"job process {pid} ended while its fork server was gone; recorded as failed")
            return 1
        return None

    def _spawn(self) -> None:
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "pcbench.forkserver", str(cmd_r), str(rep_w)],
                                         pass_fds=(cmd_r, rep_w), preexec_fn=_ignore_stop_signals)
        finally:
            os.close(cmd_r)
            os.close(rep_w)
        self.cmd, self.reply = cmd_w, rep_r
        os.set_inheritable(self.cmd, False)
        os.set_inheritable(self.reply, False)
        ready = self._wait_for("ready")
        if ready is not None and self.last.get("threads", 1) > 1:  # a fork would copy a thread's locks
            _say(f"fork server has {self.last['threads']} threads: runs start as fresh processes")
            self.close()
            self.broken = True
        atexit.register(self.close)

    def _send(self, msg: dict) -> None:
        try:
            os.write(self.cmd, (json.dumps(msg) + "\n").encode())
        except OSError:
            self._gone()

    def _wait_for(self, key: str) -> Optional[int]:
        while not self.broken:
            msg = self._read(None)
            if msg is not None and key in msg:
                self.last = msg
                return int(msg[key])
        return None

    def _read(self, timeout: Optional[float]) -> Optional[dict]:
        """One reply (exit reports are kept in `exits`), waiting up to `timeout` (None: until one)."""
        while b"\n" not in self.buf:
            if self.broken:
                return None
            ready, _, _ = select.select([self.reply], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.reply, 1 << 16)
            if not chunk:
                self._gone()
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "exit" in msg:
            self.exits[int(msg["exit"])] = int(msg["rc"])
        return msg

    def _gone(self) -> None:
        if not self.broken:
            _say("the fork server ended; further runs start as fresh processes")
        self.broken = True

    def close(self) -> None:
        for fd in (self.cmd, self.reply):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.cmd = self.reply = -1
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


_server = _ForkServer()


def _start_job(store: Store, run_id: str, progress: Optional[bool]) -> _Job:
    """Start one run's job: a child of the fork server running `pcbench.jobs.main` (imports paid
    once), or `python -m pcbench.jobs` under `PCBENCH_LOCAL_MODE=subprocess` (or without a server).
    The job starts with SIGINT/SIGTERM ignored until it installs its own handlers; the launcher
    forwards them."""
    args = [str(store.root), str(store.work), run_id]
    env = {**os.environ, "PCBENCH_LAUNCHER": "1"}  # the launcher reports an interruption itself
    if progress is not None:
        env["PCBENCH_PROGRESS"] = "1" if progress else "0"
    if local_mode() == "fork":
        pid = _server.start(args, env)
        if pid is not None:
            return _Job(pid)
    proc = subprocess.Popen([sys.executable, "-m", "pcbench.jobs", *args], env=env, preexec_fn=_ignore_stop_signals)
    return _Job(proc.pid, proc)


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
