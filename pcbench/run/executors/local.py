"""The local executor: every run in dependency order, each in its own process (a crash cannot take
the launcher down): a fork of one pre-imported server (`pcbench/forkserver.py`: torch/transformers/
lm-eval imported once), or a fresh `python -m pcbench.run.jobs` with `PCBENCH_LOCAL_MODE=subprocess`. Up
to `--parallel N` runs at once (default `auto`: as many as fit the cores at the threads the CPU runs
ask for, so each run keeps its thread count and its losses; a run without a thread count, or not
pinned to the CPU, takes the machine), each started once its dependencies are completed.

A run or a dependency that another process is training (it holds the run's lock, `pcbench/jobs.py`)
is waited for, with a progress line. SIGINT/SIGTERM are forwarded to the running jobs; once they
have recorded their runs `interrupted`, `run` raises `interrupts.Interrupted` (a rerun resumes).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pcbench.train import interrupts
from pcbench.util import allocator
from pcbench.spec.config import SpecError
from pcbench.run.executors.base import Executor, Outcome, say
from pcbench.run.liveness import Liveness, pid_alive
from pcbench.run.stale import rerun_reason
from pcbench.store import Store

if TYPE_CHECKING:
    from pcbench.grid import Run


class LocalExecutor(Executor):
    """Runs in child processes of this launcher, in dependency order, `parallel` at once."""

    name = "local"

    def run(self, todo: list[Run], store: Store, outcome: Outcome, *, override: dict, log_dir: Path,
            progress: Optional[bool], parallel: Optional[int | str]) -> None:
        with _prefetching(todo):
            _run_local(todo, store, outcome, progress, parallel)


LOCAL_MODES = ("fork", "subprocess")


def local_mode() -> str:
    """How the local executor starts a run: `fork` (default: a child of this pre-imported launcher)
    or `subprocess` (a fresh `python -m pcbench.run.jobs`, for debugging), from `PCBENCH_LOCAL_MODE`."""
    mode = os.environ.get("PCBENCH_LOCAL_MODE", "fork").strip() or "fork"
    if mode not in LOCAL_MODES:
        raise SpecError("PCBENCH_LOCAL_MODE", f"unknown mode {mode!r}; choose from {', '.join(LOCAL_MODES)}")
    return mode if hasattr(os, "fork") else "subprocess"


@contextlib.contextmanager
def _prefetching(todo: list[Run]):
    """While the runs go: the fork server started at once, and the runs' data prepared beside its
    imports (`pcbench/prefetch.py`; `PCBENCH_PREFETCH=0` turns it off). Stopped, if still going, when
    the runs are done."""
    proc = None
    if todo and local_mode() == "fork":
        _server.warm()
    if todo and os.environ.get("PCBENCH_PREFETCH", "1") != "0":
        from pcbench.run.prefetch import missing, needs

        items = missing(needs(todo))
        if items:
            proc = subprocess.Popen([sys.executable, "-m", "pcbench.run.prefetch", json.dumps(items)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    preexec_fn=functools.partial(_ignore_signals, signal.SIGINT, signal.SIGHUP,
                                                                 signal.SIGQUIT))
    try:
        yield
    finally:
        if proc is not None and proc.poll() is None:  # the runs ended first (failed, or stopped)
            proc.terminate()  # its half-written store is removed; stores are atomic, locks die with it
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def local_parallel(todo: list[Run], parallel: Optional[int | str] = None) -> int:
    """How many local runs at once: `parallel` (else `PCBENCH_PARALLEL`, else `auto`); `auto`: as
    many as fit the cores at the largest share a run takes (its thread count when it runs on the CPU
    with one; else every core: a GPU run or one that lets torch pick), so each run keeps its own
    thread count and the machine is not oversubscribed."""
    parallel = _parallel_setting(parallel)
    if parallel == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = [min(cores, _cores_taken(run) or cores) for run in todo]
        return max(1, cores // max(share)) if share else 1
    return parallel


def _parallel_setting(parallel: Optional[int | str]) -> int | str:
    """`parallel` (else `PCBENCH_PARALLEL`, else `auto`) as `auto` or a count >= 1; a bad value is
    refused naming where it came from."""
    where = "--parallel"
    if parallel is None:
        where, parallel = "PCBENCH_PARALLEL", os.environ.get("PCBENCH_PARALLEL", "").strip() or "auto"
    if parallel == "auto":
        return parallel
    try:
        n = int(parallel)
    except ValueError:
        raise SpecError(where, f"must be an integer or auto, not {parallel!r}") from None
    if n < 1:
        raise SpecError(where, f"must be at least 1, not {n}")
    return n


def check_environment(parallel: Optional[int | str] = None) -> list[SpecError]:
    """What the local executor would refuse only once its runs start (a bad `PCBENCH_LOCAL_MODE`, a
    bad `PCBENCH_PARALLEL` where no `--parallel` is given), as problems before any work: `run`, its
    `--dry-run` included, checks them before it writes anything."""
    problems = []
    for check in (local_mode, lambda: _parallel_setting(parallel)):
        try:
            check()
        except SpecError as e:
            problems.append(e)
    return problems


def _cores_taken(run: Run) -> Optional[int]:
    """The cores a run keeps busy: its thread count if it runs on the CPU with one, else None (all)."""
    part = getattr(run.spec, "train", None) if run.kind == "train" else run.spec
    if getattr(part, "device", None) != "cpu":
        return None
    return getattr(part, "threads", None)


def _run_local(todo: list[Run], store: Store, outcome: Outcome, progress: Optional[bool],
               parallel: Optional[int] = None) -> None:
    """Each run in its own process (a fork of this launcher, or `python -m pcbench.run.jobs`), in order,
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
        say(f"{run.id}: blocked by {', '.join(blockers)}")
        return "blocked", 0
    if waiting is None:
        state, detail = live.state(run.id, run.kind)
        # (the launcher submits a completed run only when its result may no longer stand: `run.stale`)
        if state == "completed" and rerun_reason(store, store.run(run.id)) is None:
            say(f"{run.id}: completed, and its result stands: skipped")
            return "skipped", 0
        if state == "failed" and waited_self:
            say(f"{run.id}: failed under another process: {store.status(run.id).get('error', '')}")
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
        say(f"{where}: {run.id} ({_label_str(run)})")
        job = _start_job(store, run.id, progress)
        with interrupts.deferred():
            while (rc := job.poll(wait=0.2)) is None:
                job.forward(interrupts.requested())
        result = _result_of(run, rc, store)
        if result is None:  # another process took the run's lock first
            waited_self = True
            time.sleep(0.5)
            continue
        return result


LOST = -1000  # `_Job.poll`: the job ended, but its exit status was lost (its fork server died)


def _result_of(run: Run, rc: int, store: Store) -> Optional[tuple[str, int]]:
    """What a job's exit code `rc` means for `run` (None: another process held its lock). Without
    an exit code (`LOST`) the run's records say what became of it."""
    from pcbench.run.jobs import EXIT_ALREADY, EXIT_BUSY, EXIT_OK  # lazily: submitit, once a run starts

    if rc == LOST:
        return _result_from_records(run, store)
    if rc == EXIT_OK:
        return "submitted", rc
    if rc == EXIT_ALREADY:
        return "skipped", rc
    if rc == EXIT_BUSY:
        return None
    if rc > 128 and store.state(run.id) == "completed":  # recorded before the signal could stop it
        return "submitted", rc
    if interrupts.requested() or rc in [128 + s for s in interrupts.SIGNALS]:
        return "interrupted", rc if rc > 128 else 128 + (interrupts.requested() or signal.SIGTERM)
    if rc < 0:  # the job was killed (SIGKILL, OOM killer, a segfault): nothing recorded it
        _record_unrecorded(run.id, store, "interrupted", f"killed by {signal.Signals(-rc).name}")
        say(f"{run.id}: its job was killed by {signal.Signals(-rc).name}; a rerun resumes it")
        return "interrupted", rc
    _record_unrecorded(run.id, store, "failed", f"its job exited with code {rc} without recording the run")
    return "failed", rc


def _result_from_records(run: Run, store: Store) -> tuple[str, int]:
    """The result of a job whose exit status is lost, from what it recorded: completed, failed or
    interrupted as recorded; a run left `running` by a job that is gone is recorded interrupted
    (a rerun resumes it)."""
    state = store.state(run.id)
    if state == "completed":
        say(f"{run.id}: completed (its fork server ended before it; judged by its records)")
        return "submitted", 0
    if state == "failed":
        return "failed", 1
    if state != "interrupted":
        _record_unrecorded(run.id, store, "interrupted", "its job ended while its fork server was gone, "
                           "without recording the run")
        say(f"{run.id}: its job ended without recording the run (its fork server was gone); a rerun resumes it")
    return "interrupted", 1


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
                            say(f"{run.id}: waiting for {what}, being run by {check[1][1] or 'another process'}")
                            said[run.id] = time.time()
                        continue
                    pending.remove(run)
                    if check is not None:
                        _count(outcome, bad, run, *check)
                        continue
                    started += 1
                    say(f"run {started} of {len(todo)}: {run.id} ({_label_str(run)})")
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

    def poll(self, wait: float = 0.0) -> Optional[int]:
        """The exit code, waiting up to `wait` seconds for it (returns as soon as the job ends)."""
        if self.rc is None and self.proc is not None:
            try:
                self.rc = self.proc.wait(wait) if wait > 0 else self.proc.poll()
            except subprocess.TimeoutExpired:
                pass
        elif self.rc is None:
            self.rc = _server.exit_code(self.pid, wait)
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
        self.buf, self.exits, self.broken, self.last, self.ready = b"", {}, False, {}, False

    def warm(self) -> None:
        """Start the server (its imports) without waiting for it: the launcher goes on meanwhile."""
        if self.proc is None and not self.broken:
            self._launch()

    def start(self, args: list[str], env: dict) -> Optional[int]:
        """The pid of a forked child running `pcbench.run.jobs.main(args)`, None if no server runs."""
        self.warm()
        if not self.ready and not self.broken:
            self._await_ready()
        if self.broken:
            return None
        self._send({"args": args, "env": env, "cwd": os.getcwd()})
        return self._wait_for("pid")

    def exit_code(self, pid: int, wait: float = 0.0) -> Optional[int]:
        """The exit code of child `pid`, waiting up to `wait` seconds for the server's report."""
        until = time.monotonic() + wait
        while pid not in self.exits:
            msg = self._read(max(0.0, until - time.monotonic()))
            if msg is None:
                break
        if pid in self.exits:
            return self.exits.pop(pid)
        if self.broken and not pid_alive(pid):  # the server died: the child's status is lost with it
            return LOST
        return None

    def _launch(self) -> None:
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "pcbench.run.forkserver", str(cmd_r), str(rep_w)],
                                         pass_fds=(cmd_r, rep_w), preexec_fn=_ignore_signals,
                                         env={**os.environ, **allocator.env()})  # malloc settings from its exec
        finally:
            os.close(cmd_r)
            os.close(rep_w)
        self.cmd, self.reply = cmd_w, rep_r
        os.set_inheritable(self.cmd, False)
        os.set_inheritable(self.reply, False)
        atexit.register(self.close)

    def _await_ready(self) -> None:
        ready = self._wait_for("ready")
        self.ready = ready is not None
        if ready is not None and self.last.get("threads", 1) > 1:  # a fork would copy a thread's locks
            say(f"fork server has {self.last['threads']} threads: runs start as fresh processes")
            self.close()
            self.broken = True

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
            say("the fork server ended; further runs start as fresh processes")
        self.broken = True

    def close(self) -> None:
        for fd in (self.cmd, self.reply):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.cmd = self.reply = -1
        self.ready = False
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


_server = _ForkServer()


def _start_job(store: Store, run_id: str, progress: Optional[bool]) -> _Job:
    """Start one run's job: a child of the fork server running `pcbench.run.jobs.main` (imports paid
    once), or `python -m pcbench.run.jobs` under `PCBENCH_LOCAL_MODE=subprocess` (or without a server).
    The job starts with SIGINT/SIGTERM ignored until it installs its own handlers; the launcher
    forwards them."""
    args = [str(store.root), str(store.work), run_id]
    env = {**os.environ, **allocator.env(), "PCBENCH_LAUNCHER": "1"}  # the launcher reports an interruption itself
    if progress is not None:
        env["PCBENCH_PROGRESS"] = "1" if progress else "0"
    if local_mode() == "fork":
        pid = _server.start(args, env)
        if pid is not None:
            return _Job(pid)
    proc = subprocess.Popen([sys.executable, "-m", "pcbench.run.jobs", *args], env=env, preexec_fn=_ignore_signals)
    return _Job(proc.pid, proc)


def _ignore_signals(*signals: int) -> None:
    """A child's `preexec_fn`: ignore `signals` (default: every stop signal; the launcher forwards
    them as it decides)."""
    for s in signals or interrupts.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _wait_for(store: Store, run_id: str, detail: Optional[str], for_run: str) -> None:
    """Sleep until `run_id` is no longer in flight, with a progress line every minute."""
    t0, said = time.time(), -1.0
    what = "it" if run_id == for_run else f"its dependency {run_id}"
    while Liveness(store).alive(run_id):
        if time.time() - said >= 60:
            say(f"{for_run}: waiting for {what}, being run by {detail or 'another process'} "
                 f"({time.time() - t0:.0f}s so far)")
            said = time.time()
        time.sleep(0.5)


def _label_str(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.labels.items())

