"""The grid schema: the typed form of a grid YAML, read and checked before anything expands.

`GridSpec` is the file (`name`, `defaults`, `resources`, `stages`, ...); each stage is a `StageSpec`
(`from`, `where`, `axes`, `exclude`, `spec`, `overrides`, `tune`, `extend`, `resources`, `hours`);
`Resources` is what a job asks of the scheduler. `read_grid_spec` loads the YAML strictly (unknown
keys name the field, with a "did you mean" hint); `parse_stages` types every stage and checks what
can be checked without expanding: stage references, axes, `extend` blocks, the stage DAG.
Expansion gives `Run`s and their `Grid` (`expansion.py`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pcbench.spec.config import SpecError, from_dict, load_yaml, require, to_dict
from pcbench.grid.selection import select
from pcbench.util.suggest import did_you_mean

@dataclass
class Resources:
    """What a job asks of the scheduler (submitit/SLURM)."""

    gpus_per_node: int = 0
    nodes: int = 1
    tasks_per_node: Optional[int] = None  # default: one task per GPU (torch.distributed), else 1
    cpus_per_task: int = 2
    mem_gb: Optional[float] = None
    gpu_mem_gb: Optional[float] = None  # memory per GPU (GiB): runs whose memory plan exceeds it are refused
    timeout_min: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = 64
    slurm_additional: dict = field(default_factory=dict)

    def validate(self, path: str) -> None:
        require(self.gpus_per_node >= 0, f"{path}.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        for f in ("cpus_per_task", "array_parallelism", "nodes"):
            require(getattr(self, f) >= 1, f"{path}.{f}", f"must be >= 1, got {getattr(self, f)}")
        require(self.tasks_per_node is None or self.tasks_per_node >= 1, f"{path}.tasks_per_node",
                f"must be >= 1, got {self.tasks_per_node}")
        require(self.timeout_min is None or self.timeout_min > 0, f"{path}.timeout_min",
                f"must be a positive number of minutes, got {self.timeout_min}")
        require(self.mem_gb is None or self.mem_gb > 0, f"{path}.mem_gb", f"must be positive, got {self.mem_gb}")
        require(self.gpu_mem_gb is None or self.gpu_mem_gb > 0, f"{path}.gpu_mem_gb",
                f"must be positive, got {self.gpu_mem_gb}")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def gpu_hours(self, hours: float) -> float:
        return self.nodes * self.gpus_per_node * hours


def merged_resources(run, override: dict) -> Resources:
    """A run's resources with the command line's overrides (those not None) applied."""
    return dataclasses.replace(run.resources, **{k: v for k, v in override.items() if v is not None})


@dataclass
class Tune:
    """Take `field` from the run of `stage` with the lowest `metric` among runs sharing `match` labels."""

    stage: str
    field: str = "optim.lr"
    metric: str = "train_loss_last100"
    match: list[str] = dataclasses.field(default_factory=list)


@dataclass
class Extend:
    """Extend a sweep along `axis` one log2 step (`factor`) beyond an edge that holds the best `metric`,
    at most `max_steps` times per sweep line, until the best is bracketed (`pcbench/sweep.py`)."""

    axis: str = "lr"
    max_steps: int = 3
    factor: float = 2.0
    metric: str = "train_loss_last100"


@dataclass
class Override:
    when: dict
    set: dict


@dataclass
class StageSpec:
    kind: Literal["train", "eval"] = "train"
    source: Optional[str] = None  # YAML key `from`
    where: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)
    exclude: list[dict] = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)
    tune: Optional[Tune] = None
    extend: Optional[Extend] = None  # a sweep stage: extend it until its best value is bracketed
    resources: dict = field(default_factory=dict)
    hours: Any = 1.0  # estimated wall hours per run, a number or a ${...} template (dry-run totals)


@dataclass
class GridSpec:
    name: str
    stages: dict
    description: str = ""
    defaults: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    results_dir: Optional[str] = None
    work_dir: Optional[str] = None
    prepare: dict = field(default_factory=dict)  # the prepare stage's SLURM resources (`run.prepare`)


@dataclass
class Run:
    """One concrete run of a grid."""

    id: str
    stage: str
    kind: str  # train | eval
    labels: dict
    spec: Any  # RunSpec | EvalSpec
    deps: list[str]
    resources: Resources
    hours: float
    tune: Optional[Tune] = None

    def record(self) -> dict:
        """What the store keeps in run.json."""
        return {"id": self.id, "stage": self.stage, "kind": self.kind, "labels": self.labels,
                "spec": to_dict(self.spec), "deps": self.deps,
                "tune": to_dict(self.tune) if self.tune else None}


@dataclass
class Grid:
    spec: GridSpec
    runs: list[Run]
    source: Optional[Path] = None
    stages: dict = dataclasses.field(default_factory=dict)  # name -> StageSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def by_id(self) -> dict[str, Run]:
        return {r.id: r for r in self.runs}

    def stage_order(self) -> list[str]:
        return stage_order(self.stages)

    def select(self, only: Optional[str]) -> list[Run]:
        """Runs matching a filter like `stage=compress,method=pc` (or a bare stage name), plus
        every run they depend on; in dependency order (`selection.py`)."""
        return select(self.runs, only)


def stage_order(stages: dict[str, StageSpec]) -> list[str]:
    """Stage names with every stage after those it starts or tunes from; a cycle is a SpecError."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name):] + [name]
            raise SpecError("stages", f"dependency cycle: {' -> '.join(cycle)}")
        state[name] = 1
        st = stages[name]
        for dep in filter(None, [st.source, st.tune.stage if st.tune else None]):
            visit(dep, trail + [name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def validate_extend(st, path: str) -> None:
    """Check a stage's `extend` block against its axes (one clear line on bad input)."""
    e = st.extend
    require(e.axis in st.axes, f"{path}.axis", f"{e.axis!r} is not an axis of this stage; axes: "
            f"{', '.join(st.axes) or '(none)'}")
    vals = st.axes[e.axis]
    require(all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in vals),
            f"{path}.axis", f"axis {e.axis!r} must hold finite positive numbers to extend on a log grid, got {vals}")
    require(len(set(vals)) >= 2, f"{path}.axis", f"axis {e.axis!r} needs at least 2 values to bracket a best one")
    require(isinstance(e.max_steps, int) and e.max_steps >= 0, f"{path}.max_steps", "must be an integer >= 0")
    require(e.factor > 1, f"{path}.factor", f"must be > 1 (2 is one log2 step), got {e.factor}")


def parse_stages(gs: GridSpec) -> dict[str, StageSpec]:
    """Every stage typed and checked: known `from`/`tune.stage`, non-empty axes, valid `extend`."""
    stages: dict[str, StageSpec] = {}
    require(isinstance(gs.stages, dict) and gs.stages, "stages", "give at least one stage")
    for name, raw in gs.stages.items():
        raw = dict(raw or {})
        if "from" in raw:
            raw["source"] = raw.pop("from")
        stages[name] = from_dict(StageSpec, raw, f"stages.{name}")
    for name, st in stages.items():
        for ref, where in ((st.source, "from"), (st.tune.stage if st.tune else None, "tune.stage")):
            if ref is not None and ref not in stages:
                raise SpecError(f"stages.{name}.{where}",
                                f"unknown stage {ref!r}{did_you_mean(ref, stages)}; stages: {', '.join(stages)}")
        for axis, values in st.axes.items():
            require(isinstance(values, list) and values, f"stages.{name}.axes.{axis}",
                    "an axis must be a non-empty list of values")
        if st.extend is not None:
            validate_extend(st, f"stages.{name}.extend")
    return stages


def read_grid_spec(path: str | Path) -> GridSpec:
    """Read a grid YAML file into its typed form (strict keys, a valid `name`)."""
    gs = from_dict(GridSpec, load_yaml(Path(path)), "grid")
    require(re.fullmatch(r"[A-Za-z0-9_.-]+", gs.name or "") is not None, "grid.name",
            "letters, digits, '.', '_' and '-' only")
    return gs
