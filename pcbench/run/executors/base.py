"""The executor interface: how the launcher's runs get run (`pcbench/launch.py` decides which).

An executor is handed the runs to start, in dependency order, and the `Outcome` to fill in. It
never starts a run before its dependencies are completed (or, for a scheduler, before their jobs
succeed); a run whose dependency failed or was blocked is counted blocked. It either runs them
before returning (`submits` False: local, debug) or hands them to a scheduler and returns
(`submits` True: slurm; `wait` then follows the jobs). Every executor is one entry of
`pcbench.run.executors.EXECUTORS`.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional

if TYPE_CHECKING:
    from pcbench.spec.config import SpecError
    from pcbench.grid import Run
    from pcbench.store import Store


def say(msg: str) -> None:
    """One progress line of the launcher, on stderr."""
    print(f"[pcbench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    submitted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)  # stopped by a signal or killed: resumable
    jobs: dict = field(default_factory=dict)  # run id -> submitit job (slurm/debug)
    waiting: int = 0  # runs held until a sweep is bracketed (see pcbench/sweep.py)


class Executor(ABC):
    """One way of running a grid's runs (`pcbench run --executor NAME`)."""

    name: ClassVar[str]
    submits: ClassVar[bool] = False  # True: runs are queued on a scheduler and outlive `run`

    @property
    def verb(self) -> str:
        """What `pcbench run` says it did with the runs: `submitted` or `run`."""
        return "submitted" if self.submits else "run"

    def check(self, decisions: list, override: dict) -> None:
        """Raise `SpecError` before anything is written if a run to submit cannot be (`decisions`:
        `launch.Decision`s; `override`: command-line resources)."""

    def preflight(self, runs: list[Run], override: dict) -> list[SpecError]:
        """Problems with starting `runs` that only this executor can find (empty: none)."""
        return []

    @abstractmethod
    def run(self, todo: list[Run], store: Store, outcome: Outcome, *, override: dict, log_dir: Path,
            progress: Optional[bool], parallel: Optional[int | str]) -> None:
        """Run or submit `todo` (in dependency order), recording what happened in `outcome`; on
        SIGINT/SIGTERM an in-process executor raises `interrupts.Interrupted`."""

    def wait(self, outcome: Outcome, store: Store) -> None:
        """Wait until the runs `run` submitted have ended and make `outcome`'s counts the truth
        (in-process executors have nothing to wait for)."""

    def interrupted(self, stop) -> str:
        """What `pcbench run` says after `stop` (an `interrupts.Interrupted`) ended it."""
        rid = getattr(stop, "run_id", None)
        if rid:
            return (f"run {rid} recorded interrupted" + (f" at step {stop.step}" if stop.step is not None else "")
                    + ", its checkpoints kept")
        return "no run was in progress"
