"""The SLURM executor: one job array per stage (per group of runs sharing the same resources and
dependencies), with `afterok` dependencies on the jobs of the runs they start from (submitted now
or still in flight from an earlier launch); resources from the grid YAML, overridable on the
command line. Jobs requeue on timeout/preemption and resume from checkpoints. Before anything is
submitted, every distinct job request goes through `sbatch --test-only` with the parameters
submitit submits with; `wait` follows the jobs and records what they left unrecorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pcbench.util import allocator
from pcbench.spec.config import SpecError
from pcbench.run.executors.base import Outcome, say
from pcbench.run.executors.submitit_base import SubmititExecutor
from pcbench.run.liveness import NEVER, SLURM_ALIVE, slurm_states
from pcbench.store import Store

if TYPE_CHECKING:
    from pcbench.grid import Resources, Run


class SlurmExecutor(SubmititExecutor):
    """Runs as SLURM job arrays through `submitit.SlurmExecutor`."""

    name = "slurm"
    cluster = "slurm"
    submits = True

    def make(self, log_dir: Path, res: Resources):
        ex, _ = super().make(log_dir, res)
        extra = dict(res.slurm_additional)
        params = dict(timeout_min=res.timeout_min, nodes=res.nodes, tasks_per_node=res.tasks,
                      cpus_per_task=res.cpus_per_task, slurm_partition=res.partition,
                      slurm_array_parallelism=res.array_parallelism, slurm_signal_delay_s=60)
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        if res.mem_gb:
            params["mem_gb"] = res.mem_gb
        if allocator.env():  # malloc settings from the job's exec, before any thread (util/allocator.py)
            params["slurm_setup"] = [f"export {k}={v}" for k, v in allocator.env().items()]
        for key, f in (("slurm_account", "account"), ("slurm_qos", "qos"), ("slurm_constraint", "constraint")):
            if getattr(res, f):
                params[key] = getattr(res, f)
        ex.update_parameters(**params)
        return ex, extra

    def in_flight_job(self, status: dict) -> Optional[str]:
        return str(status["job_id"]) if status.get("executor") == "slurm" else None

    def submit_group(self, ex, extra: dict, waits: tuple, jobs: list) -> list:
        if waits:
            extra["dependency"] = "afterok:" + ":".join(waits)
            extra["kill-on-invalid-dep"] = "yes"
        if extra:
            ex.update_parameters(slurm_additional_parameters=extra)
        with ex.batch():
            out = [ex.submit(job) for job in jobs]
        return out

    def submitted(self, group: list[Run], jobs: list, store: Store, outcome: Outcome) -> None:
        for run, job in zip(group, jobs):
            store.set_status(run.id, "submitted", job_id=str(job.job_id), executor="slurm")

    def check(self, decisions: list, override: dict) -> None:
        """Refuse before submitting anything if a SLURM job would lack a required resource."""
        from pcbench.grid import merged_resources

        for d in decisions:
            if d.action != "submit":
                continue
            r = merged_resources(d.run, override)
            for f in ("partition", "timeout_min"):
                if getattr(r, f) is None:
                    raise SpecError(f"stages.{d.run.stage}.resources.{f}",
                                    "required for --executor slurm (set it in the grid or on the command line)")

    def preflight(self, runs: list[Run], override: dict) -> list[SpecError]:
        """`sbatch --test-only` of every distinct (stage, resources) request, through the parameters
        submitit would submit with; dependencies left out (their jobs do not exist yet)."""
        from pcbench.grid import merged_resources

        problems: list[SpecError] = []
        done: set[tuple] = set()
        with tempfile.TemporaryDirectory(prefix="pcbench-sbatch-") as tmp:
            for run in runs:
                res = merged_resources(run, override)
                field = f"stages.{run.stage}.resources"
                try:
                    res.validate(field)
                except SpecError as e:
                    problems.append(e)
                    continue
                key = (run.stage, json.dumps(res.__dict__, sort_keys=True, default=str))
                device = getattr(getattr(run.spec, "train", run.spec), "device", None)
                if res.gpus_per_node == 0 and device == "cuda":  # the job could not see a GPU
                    if key not in done:
                        where = "train.device" if hasattr(run.spec, "train") else "device"
                        problems.append(SpecError(f"{field}.gpus_per_node", f"0 GPUs asked (or --gpus 0) for "
                                                  f"stage {run.stage!r}, whose runs set {where}: cuda"))
                    done.add(key)
                    continue
                if key in done:
                    continue
                done.add(key)
                ex, extra = self.make(Path(tmp), res)
                if extra:
                    ex.update_parameters(slurm_additional_parameters=extra)
                ex.update_parameters(name=f"pcbench-{run.stage}")
                script = Path(tmp) / f"{len(done)}.sh"
                script.write_text(ex._executor._make_submission_file_text("true", "preflight"))
                try:
                    out = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True,
                                         timeout=60, env={**os.environ})
                except FileNotFoundError:
                    return [SpecError("--executor", "slurm: sbatch is not on PATH")]
                except subprocess.TimeoutExpired:
                    return [SpecError("--executor", "slurm: sbatch --test-only did not answer in 60 s")]
                if out.returncode != 0:
                    lines = [ln.strip() for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
                    why = "; ".join(dict.fromkeys(lines)) or f"exit code {out.returncode}"
                    ask = ", ".join(f"{k}={v}" for k, v in (("partition", res.partition),
                                                            ("cpus_per_task", res.cpus_per_task),
                                                            ("gpus_per_node", res.gpus_per_node),
                                                            ("mem_gb", res.mem_gb), ("nodes", res.nodes),
                                                            ("timeout_min", res.timeout_min)) if v is not None)
                    problems.append(SpecError(field, f"sbatch refuses this stage's job ({ask}): {why}"))
        return problems

    def wait(self, outcome: Outcome, store: Store) -> None:
        wait_for_jobs(outcome, store)

    def interrupted(self, stop) -> str:
        return "stopped waiting (the SLURM jobs go on)"


def wait_for_jobs(outcome: Outcome, store: Store, poll_s: float = 3.0) -> None:
    """Wait for the SLURM jobs of `outcome`, then make its counts the truth: a run whose job failed
    is counted failed; one SLURM cancelled because a dependency failed (`afterok`) is recorded
    `cancelled` and counted blocked (as is one left pending with DependencyNeverSatisfied, which is
    scancelled first); one whose job ended without recording it is recorded
    `interrupted` (a rerun resumes it). A progress line whenever the counts change (or each minute)."""
    pending = {rid: str(job.job_id) for rid, job in outcome.jobs.items()}
    said, last = 0.0, None
    while pending:
        states = slurm_states(pending.values())
        for rid, job in list(pending.items()):
            js = states.get(job)
            if js in SLURM_ALIVE or (js is None and store.state(rid) in ("submitted", "running")):
                continue
            if js == NEVER:  # our job, queued forever on a cluster without kill_invalid_depend
                try:
                    subprocess.run(["scancel", job], capture_output=True, timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    pass  # recorded cancelled either way: it can never run
                js = "CANCELLED"
            del pending[rid]
            _settle(rid, job, js or "UNKNOWN", store, outcome)
        counts = (len(outcome.jobs) - len(pending), len(pending))
        if pending and (counts != last or time.time() - said >= 60):
            say(f"waiting for {counts[1]} SLURM job(s); {counts[0]} of {len(outcome.jobs)} done")
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
