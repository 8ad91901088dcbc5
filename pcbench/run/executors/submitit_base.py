"""Executors through submitit (debug, slurm): the runs grouped into one submission per stage and
resources, split further by the jobs they must wait for; a run whose dependency failed or was
blocked is counted blocked and never submitted. Subclasses say how submitit is configured, how a
group is submitted and what follows a submission.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional

from pcbench.run.executors.base import Executor, Outcome, say
from pcbench.run.liveness import Liveness
from pcbench.store import Store

if TYPE_CHECKING:
    from pcbench.grid import Resources, Run


class SubmititExecutor(Executor):
    """Runs as submitit jobs (`pcbench.run.jobs.RunJob`) of `submitit.AutoExecutor(cluster=cluster)`."""

    cluster: ClassVar[str]
    after: Optional[str] = None  # a job every run waits for (afterok): the prepare stage's last

    def make(self, log_dir: Path, res: Resources):
        """(submitit executor for jobs of resources `res`, extra scheduler parameters)."""
        import submitit  # lazily: only a submission pays for it

        return submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster=self.cluster), {}

    def in_flight_job(self, status: dict) -> Optional[str]:
        """The job to wait for of a dependency in flight elsewhere (None: it cannot be waited for)."""
        return None

    def submit_group(self, ex, extra: dict, waits: tuple, jobs: list) -> list:
        """Submit `jobs` (RunJobs) after the jobs `waits`; returns the submitit jobs."""
        return [ex.submit(job) for job in jobs]

    def submitted(self, group: list[Run], jobs: list, store: Store, outcome: Outcome) -> None:
        """After `group` was submitted as `jobs`."""

    def run(self, todo: list[Run], store: Store, outcome: Outcome, *, override: dict, log_dir: Path,
            progress: Optional[bool], parallel: Optional[int | str]) -> None:
        from pcbench.spec.config import to_dict
        from pcbench.grid import merged_resources
        from pcbench.run.jobs import RunJob  # lazily: submitit, only when something is submitted

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
                waits, blockers = ([self.after] if self.after else []), []
                for d in run.deps:
                    if d in outcome.blocked or d in outcome.failed:
                        blockers.append(f"{d} ({'failed' if d in outcome.failed else 'blocked'})")
                    elif d in job_of:
                        waits.append(job_of[d])
                    else:  # not submitted now: completed, or in flight in a job to wait for
                        state, detail = live.state(d)
                        job = self.in_flight_job(store.status(d)) if state in ("submitted", "running") else None
                        if job is not None:
                            waits.append(job)
                        elif state != "completed":
                            blockers.append(f"{d} ({state}{', ' + detail if detail else ''})")
                if blockers:  # never started before its dependencies are completed
                    outcome.blocked.append(run.id)
                    say(f"{run.id}: blocked by {', '.join(blockers)}")
                    continue
                by_deps.setdefault(tuple(sorted(set(waits))), []).append(run)
            for waits, group in by_deps.items():
                ex, extra = self.make(log_dir, res)
                ex.update_parameters(name=f"pcbench-{stage}")
                jobs = self.submit_group(ex, extra, waits, [RunJob(str(store.root), str(store.work), run.id, progress)
                                                            for run in group])
                for run, job in zip(group, jobs):
                    job_of[run.id] = str(job.job_id)
                    outcome.jobs[run.id] = job
                    outcome.submitted.append(run.id)
                self.submitted(group, jobs, store, outcome)
