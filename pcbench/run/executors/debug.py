"""The debug executor: submitit's debug executor, every run inline in this process, in dependency
order (pdb on failure); a failed run is counted failed and blocks its dependents."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcbench.run.executors.base import Outcome
from pcbench.run.executors.submitit_base import SubmititExecutor
from pcbench.store import Store

if TYPE_CHECKING:
    from pcbench.grid import Run


class DebugExecutor(SubmititExecutor):
    """Runs in this process through `submitit.DebugExecutor`."""

    name = "debug"
    cluster = "debug"

    def submitted(self, group: list[Run], jobs: list, store: Store, outcome: Outcome) -> None:
        for run, job in zip(group, jobs):  # debug jobs run when their result is asked for, in order
            try:
                job.result()
            except Exception:  # noqa: BLE001 - recorded in the store
                outcome.failed.append(run.id)
