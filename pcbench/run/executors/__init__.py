"""The executors registry: `pcbench run --executor NAME` runs a grid's runs through `EXECUTORS[NAME]`
(`base.Executor`: submit runs respecting dependencies, wait, whether it submits or runs in-process,
what it says). A new executor is one module here and one entry below.

- `local`: each run in its own process of this launcher (`local.py`, `pcbench/forkserver.py`).
- `debug`: submitit's debug executor, inline in this process (`debug.py`).
- `slurm`: SLURM job arrays through submitit, `afterok` dependencies (`slurm.py`).
"""

from __future__ import annotations

from pcbench.spec.config import SpecError
from pcbench.run.executors.base import Executor, Outcome, say  # noqa: F401 (re-exported)
from pcbench.run.executors.debug import DebugExecutor
from pcbench.run.executors.local import LocalExecutor
from pcbench.run.executors.slurm import SlurmExecutor

EXECUTORS: dict[str, Executor] = {ex.name: ex for ex in (LocalExecutor(), DebugExecutor(), SlurmExecutor())}


def named(name: str) -> Executor:
    """The registered executor `name`; an unknown one is one line naming the known ones."""
    if name not in EXECUTORS:
        raise SpecError("--executor", f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
    return EXECUTORS[name]
