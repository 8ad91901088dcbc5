"""What a job executes: one run of a grid, read from and recorded into the store.

`RunJob` is a submitit `Checkpointable`: on a SLURM timeout or preemption submitit requeues it and
the run resumes from its own last checkpoint. It also runs as `python -m pcbench.run.jobs RESULTS WORK
RUN_ID` (the local executor runs every run this way, in sequence).

Exactly one process trains a run: the job takes the run's lock first (`Store.try_lock`; a dead
holder's lock is free) and holds it until the run is recorded; a job that finds the lock held, or
the run already completed once it holds the lock, does nothing. SIGINT/SIGTERM/SIGHUP/SIGQUIT record the run
`interrupted` (resumable; its checkpoints kept). Exit codes of `python -m pcbench.run.jobs`: `EXIT_*`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Optional

import submitit

from pcbench import tracking
from pcbench.util import allocator, crashes, quiet

from pcbench.train import interrupts
from pcbench.spec.config import RunSpec, SpecError, from_dict
from pcbench.grid.fieldpath import field_value, with_field
from pcbench.run.stale import input_digests, rerun_reason, tuned_value  # noqa: F401 (tuned_value re-exported)
from pcbench.store import Store, new_lineage

EXIT_OK = 0  # trained (or evaluated) and recorded completed
EXIT_FAILED = 1
EXIT_ALREADY = 3  # already completed when this job got the run's lock: nothing done
EXIT_BUSY = 75  # another live process holds the run's lock (EX_TEMPFAIL)


class RunBusy(RuntimeError):
    """Another live process is training this run."""

    def __init__(self, run_id: str, holder: Optional[dict]):
        h = holder or {}
        self.holder = h
        super().__init__(f"run {run_id} is being run by pid {h.get('pid', '?')} on {h.get('host', '?')}")

log = logging.getLogger(__name__)


def _hub_offline() -> None:
    """huggingface_hub / datasets read HF_HUB_OFFLINE when imported: a process forked after their
    import (the fork server) is told here too."""
    import sys

    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        cfg = sys.modules["datasets"].config
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


def resolved_train_spec(run: dict, store: Store) -> tuple[RunSpec, dict]:
    """The run's typed spec with its `run:<id>` base and its tuned field filled in (each patched on
    the typed spec, `grid.fieldpath`, then validated), plus what was tuned (the final record's
    `tuned`: field, value, from_run)."""
    where = f"run {run['id']}"
    spec = from_dict(RunSpec, run["spec"], where)
    if spec.model.path:
        spec = with_field(spec, "model.path", store.resolve_ref(spec.model.path, "spec.model.path"), where)
    filled: dict[str, Any] = {}
    value, src = tuned_value(run, store)
    if src is not None:
        field = run["tune"]["field"]
        spec = with_field(spec, field, value, where)
        filled = {"field": field, "value": field_value(spec, field), "from_run": src}
    spec.validate(where)
    return spec, filled


def done(store: Store, run_id: str, kind: Optional[str] = None) -> bool:
    """Is the run completed, and does its result still stand (`stale.rerun_reason`: its export
    intact, its tuned value still the best, the models it loaded not trained again since)? The
    launcher submits a completed run only when one of those may have changed, and the job runs it
    again only when one did."""
    if store.health(run_id, kind)[0] != "completed":
        return False
    return rerun_reason(store, store.run(run_id)) is None


class RunJob(submitit.helpers.Checkpointable):
    """Execute one run of the store; marks it running / completed / failed."""

    def __init__(self, results: str, work: str, run_id: str, progress: Optional[bool] = None):
        self.results = str(results)
        self.work = str(work)
        self.run_id = run_id
        self.progress = progress

    def __call__(self) -> dict:
        allocator.tune()
        crashes.enable()  # a native crash leaves each thread's Python stack in the job's log
        quiet.third_party_bars()
        with interrupts.graceful(), interrupts.group_closed_at_an_agreed_end():
            return self._call()

    def _call(self) -> dict:
        if os.environ.get("HF_HUB_OFFLINE") == "1":  # the prepare stage fetched everything: stay offline
            _hub_offline()
        store = Store(self.results, self.work)
        run = store.run(self.run_id)
        job_id, executor = None, "local"
        try:
            env = submitit.JobEnvironment()
            job_id = env.job_id
            executor = "slurm" if "SLURM_JOB_ID" in os.environ else "local"
            if env.num_tasks > 1:  # one task per GPU: join torch.distributed
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        except RuntimeError:
            pass  # not inside a submitit job
        main = int(os.environ.get("RANK", "0")) == 0
        lock = None
        if main:  # the other ranks of a multi-process job follow rank 0
            lock = store.try_lock(self.run_id)
            if lock is None:
                raise RunBusy(self.run_id, store.lock_holder(self.run_id))
        try:
            return self._run_locked(store, run, job_id, executor, main)
        finally:
            if lock is not None:
                lock.release()

    def _run_locked(self, store: Store, run: dict, job_id, executor: str, main: bool) -> dict:
        if main and done(store, self.run_id, run["kind"]):
            return {"run": self.run_id, "already": True}  # another process finished it meanwhile
        # The lineage ties the run's work state to these records (`store.claim_work`): kept while
        # the records last, drawn anew when they are new (or were deleted, or are unreadable).
        status = store.status(self.run_id) if main else {}
        lineage = status.get("lineage")
        adopt = False
        if lineage is None and main:  # (the other ranks write no state of their own)
            lineage = new_lineage()
            # records of an older pcbench that started the run, before lineages: its state is theirs
            adopt = status.get("state") not in ("pending", "damaged") and status.get("attempts", 0) >= 1
        try:
            if main:
                store.set_status(self.run_id, "running", job_id=job_id, executor=executor,
                                 pid=os.getpid(), started=time.time(), lineage=lineage)
            if run["kind"] == "train":
                from pcbench.train.loop import train

                spec, tuned = resolved_train_spec(run, store)
                paths = store.paths(self.run_id)
                tracked = tracking.RunInfo(self.run_id, run["stage"], paths.work, group=store.root.name,
                                           store=store.work)  # the grid's trackers (spec train.track)
                inputs = input_digests(run, store)  # what it loads, as it is now (`stale`)
                provenance = {**({"tuned": tuned} if tuned else {}), **({"inputs": inputs} if inputs else {})}
                record = train(spec, paths, progress=self.progress, name=self.run_id,
                               provenance=provenance or None, tracked=tracked,
                               lineage=lineage, adopt=adopt)
            elif run["kind"] == "eval":
                from pcbench.evaluate import run_eval

                record = run_eval(run, store, inputs=input_digests(run, store))
            else:
                raise SpecError("kind", f"unknown run kind {run['kind']!r}")
        except interrupts.Interrupted as e:
            if main:
                store.set_status(self.run_id, "interrupted", job_id=job_id, error=str(e), step=e.step)
            raise
        except BaseException as e:
            if main:
                store.fail(self.run_id, e, job_id=job_id, step=getattr(e, "step", None))
            raise
        if main:
            with interrupts.deferred():  # recorded whole; a signal now only sets the exit code
                store.set_status(self.run_id, "completed", job_id=job_id)
        return {"run": self.run_id, "train_loss_last100": record.get("train_loss_last100")}


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m pcbench.run.jobs RESULTS WORK RUN_ID`: run one run in this process."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3:
        print("usage: python -m pcbench.run.jobs RESULTS WORK RUN_ID", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with interrupts.graceful():  # from the start: a signal during start-up is one line too
        try:
            progress = {"1": True, "0": False}.get(os.environ.get("PCBENCH_PROGRESS", ""))
            out = RunJob(*args, progress=progress)()
        except interrupts.Interrupted as e:
            if os.environ.get("PCBENCH_LAUNCHER") != "1":
                print(f"[pcbench] {args[2]}: {e}; its checkpoints are kept, a rerun resumes it", file=sys.stderr)
            return e.exit_code
        except RunBusy as e:
            print(f"[pcbench] {e}: not started here", file=sys.stderr)
            return EXIT_BUSY
        except Exception as e:  # noqa: BLE001 - recorded in the store; exit code tells the launcher
            print(f"run {args[2]} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_FAILED
        signum = interrupts.requested()
    if signum is not None:  # the run was recorded before the signal could stop it
        return 128 + signum
    return EXIT_ALREADY if out.get("already") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
