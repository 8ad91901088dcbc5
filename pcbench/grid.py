"""Declarative grids: one YAML describes a study; expansion gives concrete runs and their DAG.

A grid has stages (e.g. pretrain -> compress -> eval). A stage has axes (their product gives its
runs), may start `from` every run of another stage (filtered by `where`), and fills a run spec
from templates: `${expr}` is a small arithmetic expression over the run's labels (axis values,
inherited from the parent run), `params` (the model's exact parameter count) and `parent` (the
parent run: `parent.id`, `parent.spec...`). `overrides` set fields for runs whose labels match;
`exclude` drops combinations. A stage can `tune` one field from another stage's best run (e.g.
each method's best learning rate from a sweep), resolved when the run starts; a sweep stage can
`extend` itself beyond an edge best until that best is bracketed (`pcbench/sweep.py`).

Run ids are `<stage>-<hash>` of the resolved spec, so adding an axis value or editing another
stage never renames existing runs.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Optional

import yaml

from pcbench.config import (DataSpec, EvalSpec, ModelSpec, RunSpec, SpecError, from_dict, load_yaml, require,
                            to_dict)
from pcbench.presets import param_count, resolved_preset, vocab_size_for
from pcbench.store import parse_ref


# ---------------------------------------------------------------------------------------------
# Grid schema


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
        return _stage_order(self.stages)

    def select(self, only: Optional[str]) -> list[Run]:
        """Runs matching a filter like `stage=compress,method=pc` (or a bare stage name), plus
        every run they depend on; in dependency order."""
        if not only:
            return list(self.runs)
        conds = _parse_filter(only)
        chosen = {r.id for r in self.runs if all(_label_matches(_labels_with_stage(r), k, v)
                                                 for k, v in conds.items())}
        if not chosen:
            raise SpecError("--only", f"{only!r} matches no run")
        runs = self.by_id()
        stack = list(chosen)
        while stack:
            for d in runs[stack.pop()].deps:
                if d not in chosen:
                    chosen.add(d)
                    stack.append(d)
        return [r for r in self.runs if r.id in chosen]


def _labels_with_stage(run: Run) -> dict:
    return {"stage": run.stage, "id": run.id, **run.labels}


def _parse_filter(only: str) -> dict[str, list[str]]:
    conds: dict[str, list[str]] = {}
    for part in only.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            conds.setdefault("stage", []).append(part)
            continue
        k, v = part.split("=", 1)
        conds.setdefault(k.strip(), []).extend(x.strip() for x in v.split("|"))
    return conds


def _label_matches(labels: dict, key: str, wanted) -> bool:
    if key not in labels:
        return False
    wanted = wanted if isinstance(wanted, list) else [wanted]
    have = labels[key]
    return any(str(have) == str(w) or _num_eq(have, w) for w in wanted)


def _num_eq(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Templates: ${expr}

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b}
_FUNCS = {"int": int, "float": float, "round": round, "min": min, "max": max, "str": str, "abs": abs}


class _Unknown(Exception):
    def __init__(self, name: str):
        self.name = name


def _eval(node: ast.AST, ctx: dict) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, ctx)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _FUNCS:
            return _FUNCS[node.id]
        if node.id not in ctx:
            raise _Unknown(node.id)
        v = ctx[node.id]
        return v() if callable(v) and not isinstance(v, type) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, ctx), _eval(node.right, ctx))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        v = _eval(node.operand, ctx)
        return -v if isinstance(node.op, ast.USub) else (not v if isinstance(node.op, ast.Not) else v)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
        return _CMPOPS[type(node.ops[0])](_eval(node.left, ctx), _eval(node.comparators[0], ctx))
    if isinstance(node, ast.BoolOp):
        vals = [_eval(v, ctx) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.IfExp):
        return _eval(node.body, ctx) if _eval(node.test, ctx) else _eval(node.orelse, ctx)
    if isinstance(node, ast.Attribute):
        base = _eval(node.value, ctx)
        if isinstance(base, dict):
            if node.attr not in base:
                raise _Unknown(node.attr)
            return base[node.attr]
        if not hasattr(base, node.attr):
            raise _Unknown(node.attr)
        return getattr(base, node.attr)
    if isinstance(node, ast.Subscript):
        return _eval(node.value, ctx)[_eval(node.slice, ctx)]
    if isinstance(node, (ast.Dict,)):
        return {_eval(k, ctx): _eval(v, ctx) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, ctx) for e in node.elts]
    if isinstance(node, ast.Call) and not node.keywords:
        fn = _eval(node.func, ctx)
        if fn not in _FUNCS.values():
            raise ValueError("only int, float, round, min, max, str and abs may be called")
        return fn(*[_eval(a, ctx) for a in node.args])
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def evaluate(expr: str, ctx: dict, path: str) -> Any:
    """Evaluate one `${...}` expression; errors name the field path and the known names."""
    try:
        return _eval(ast.parse(expr.strip(), mode="eval"), ctx)
    except _Unknown as e:
        names = sorted(k for k in ctx if not k.startswith("_"))
        close = difflib.get_close_matches(e.name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(path, f"unknown name {e.name!r} in ${{{expr}}}{hint}; known: {', '.join(names)}") from None
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - any evaluation error is a spec error
        raise SpecError(path, f"cannot evaluate ${{{expr}}}: {e}") from None


def _spans(text: str, path: str = "") -> list[tuple[int, int, str]]:
    """(start, end, expression) of every `${...}` in `text`, braces balanced inside."""
    out, i = [], 0
    while True:
        start = text.find("${", i)
        if start < 0:
            return out
        depth, j = 0, start + 1
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if j >= len(text):
            raise SpecError(path or "template", f"unclosed ${{ in {text!r}")
        out.append((start, j + 1, text[start + 2:j]))
        i = j + 1


def substitute(value: Any, ctx: dict, path: str) -> Any:
    """Fill `${...}` templates in a nested structure. A string that is exactly one template keeps
    the expression's type; otherwise the results are formatted into the string."""
    if isinstance(value, dict):
        return {k: substitute(v, ctx, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, ctx, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        spans = _spans(value, path)
        if len(spans) == 1 and spans[0][0] == 0 and spans[0][1] == len(value):
            return evaluate(spans[0][2], ctx, path)
        out, last = [], 0
        for a, b, expr in spans:
            out += [value[last:a], str(evaluate(expr, ctx, path))]
            last = b
        return "".join(out + [value[last:]])
    return value


def _template_names(value: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(value, dict):
        for v in value.values():
            names |= _template_names(v)
    elif isinstance(value, list):
        for v in value:
            names |= _template_names(v)
    elif isinstance(value, str) and "${" in value:
        for _, _, expr in _spans(value):
            try:
                names |= {n.id for n in ast.walk(ast.parse(expr.strip(), mode="eval")) if isinstance(n, ast.Name)}
            except SyntaxError:
                pass
    return names


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base` (mappings recursively, everything else replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------------------------
# Expansion


def _stage_order(stages: dict[str, StageSpec]) -> list[str]:
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


def identity(obj: Any) -> Any:
    """The parts of a spec that differ from their defaults (nested). Hashing this instead of the
    whole spec keeps run ids stable when a new field with a neutral default is added."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(v):
            sub = identity(v)
            if default is dataclasses.MISSING or not dataclasses.is_dataclass(default) or sub != identity(default):
                out[f.name] = sub
        elif v != default:
            out[f.name] = v
    return out


def run_id(stage: str, kind: str, spec: Any, tune: Optional[dict]) -> str:
    """Stable id: the stage name and a hash of the resolved spec's non-default fields (resources
    excluded)."""
    blob = json.dumps({"kind": kind, "spec": identity(spec), "tune": tune}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def validate_extend(st, path: str) -> None:
    """Check a stage's `extend` block against its axes (one clear line on bad input)."""
    e = st.extend
    require(e.axis in st.axes, f"{path}.axis", f"{e.axis!r} is not an axis of this stage; axes: "
            f"{', '.join(st.axes) or '(none)'}")
    vals = st.axes[e.axis]
    require(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in vals),
            f"{path}.axis", f"axis {e.axis!r} must hold positive numbers to extend on a log grid, got {vals}")
    require(len(set(vals)) >= 2, f"{path}.axis", f"axis {e.axis!r} needs at least 2 values to bracket a best one")
    require(isinstance(e.max_steps, int) and e.max_steps >= 0, f"{path}.max_steps", "must be an integer >= 0")
    require(e.factor > 1, f"{path}.factor", f"must be > 1 (2 is one log2 step), got {e.factor}")


def _params_fn(spec_dict: dict, path: str):
    def params() -> int:
        m = from_dict(ModelSpec, spec_dict.get("model", {}), f"{path}.model")
        m.validate(f"{path}.model")
        d = from_dict(DataSpec, spec_dict.get("data", {}), f"{path}.data")
        vocab = vocab_size_for(d.tokenizer)
        if vocab is None:
            raise SpecError(f"{path}.data.tokenizer", f"cannot count parameters: vocabulary size of "
                            f"{d.tokenizer!r} is unknown before it is loaded")
        return param_count(resolved_preset(m), vocab)  # counted without torch
    return params


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def _matches(labels: dict, cond: dict) -> bool:
    return all(_label_matches(labels, k, _as_list(v)) for k, v in cond.items())


def _ns(d: Any) -> Any:
    if isinstance(d, dict):
        return SimpleNamespace(**{k: _ns(v) for k, v in d.items()})
    return d


def _check_axes_used(name: str, st: StageSpec) -> None:
    used = _template_names(st.spec) | {k for o in st.overrides for k in o.when} | \
        {k for e in st.exclude for k in e} | set(st.tune.match if st.tune else [])
    used |= {n for o in st.overrides for n in _template_names(o.set)} | _template_names(st.hours)
    for axis in st.axes:
        if axis not in used:
            close = difflib.get_close_matches(axis, sorted(used), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"stages.{name}.axes.{axis}",
                            f"axis is not used by the stage's spec, overrides or exclude{hint}")


def expand(gs: GridSpec, source: Optional[Path] = None) -> Grid:
    """All runs of the grid, in dependency order; every spec validated before anything runs."""
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
                close = difflib.get_close_matches(ref, stages, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(f"stages.{name}.{where}", f"unknown stage {ref!r}{hint}; stages: {', '.join(stages)}")
        for axis, values in st.axes.items():
            require(isinstance(values, list) and values, f"stages.{name}.axes.{axis}",
                    "an axis must be a non-empty list of values")
        if st.extend is not None:
            validate_extend(st, f"stages.{name}.extend")
    base_res = from_dict(Resources, gs.resources, "resources")
    base_res.validate("resources")

    runs: list[Run] = []
    by_stage: dict[str, list[Run]] = {}
    for name in _stage_order(stages):
        st = stages[name]
        path = f"stages.{name}"
        res = from_dict(Resources, deep_merge(to_dict(base_res), st.resources), f"{path}.resources")
        res.validate(f"{path}.resources")
        parents: list[Optional[Run]] = [None]
        if st.source:
            parents = [p for p in by_stage[st.source] if _matches(p.labels, st.where)]
            require(bool(parents), f"{path}.where", f"no run of stage {st.source!r} matches {st.where}")
        axis_names = list(st.axes)
        out: list[Run] = []
        for parent in parents:
            for combo in itertools.product(*(st.axes[a] for a in axis_names)):
                labels = {**(parent.labels if parent else {}), **dict(zip(axis_names, combo))}
                if any(_matches(labels, e) for e in st.exclude):
                    continue
                raw = st.spec
                for o in st.overrides:
                    if _matches(labels, o.when):
                        raw = deep_merge(raw, o.set)
                base = gs.defaults if st.kind == "train" else {}
                merged = deep_merge(base, raw)
                ctx: dict[str, Any] = dict(labels)
                if parent is not None:
                    ctx["parent"] = SimpleNamespace(id=parent.id, stage=parent.stage, labels=_ns(parent.labels),
                                                    spec=_ns(to_dict(parent.spec)), **{
                                                        k: v for k, v in parent.labels.items()})
                # Model and data first, so that `params` can be counted for the rest.
                first = {k: substitute(merged.get(k, {}), ctx, f"{path}.spec.{k}")
                         for k in ("model", "data") if k in merged}
                ctx["params"] = _params_fn(first, f"{path}.spec")
                resolved = substitute({k: v for k, v in merged.items() if k not in first}, ctx, f"{path}.spec")
                resolved.update(first)
                spec_path = f"{path}.spec[{', '.join(f'{k}={v}' for k, v in labels.items())}]"
                if st.kind == "train":
                    spec = from_dict(RunSpec, resolved, spec_path)
                else:
                    spec = from_dict(EvalSpec, resolved, spec_path)
                spec.validate(spec_path) if st.kind == "eval" else _validate_train(spec, spec_path)
                tune_dict = to_dict(st.tune) if st.tune else None
                rid = run_id(name, st.kind, spec, tune_dict)
                deps = [parent.id] if parent else []
                if st.tune:
                    tuned = [r.id for r in by_stage[st.tune.stage]
                             if all(_label_matches(r.labels, k, [labels.get(k)]) for k in st.tune.match)]
                    require(bool(tuned), f"{path}.tune", f"no run of stage {st.tune.stage!r} matches {st.tune.match}")
                    deps += tuned
                hours = substitute(st.hours, {**ctx, "tokens": getattr(getattr(spec, "train", None), "tokens", None)},
                                   f"{path}.hours")
                require(isinstance(hours, (int, float)) and hours >= 0, f"{path}.hours",
                        f"must evaluate to a non-negative number, got {hours!r}")
                out.append(Run(rid, name, st.kind, labels, spec, deps, res, float(hours), st.tune))
        _check_axes_used(name, st)
        seen: dict[str, Run] = {}
        for r in out:
            if r.id in seen:
                raise SpecError(f"{path}.axes", f"runs {seen[r.id].labels} and {r.labels} resolve to the same "
                                "spec: an axis does not change the run")
            seen[r.id] = r
        by_stage[name] = out
        runs.extend(out)
    _check_references(runs)
    return Grid(gs, runs, source, stages)


def references(run: Run) -> list[tuple[str, str]]:
    """(field, run id) of every `run:<id>` model this run loads."""
    spec = run.spec
    field, ref = ("model", spec.model) if isinstance(spec, EvalSpec) else ("model.path", spec.model.path)
    rid = parse_ref(ref)
    return [] if rid is None else [(field, rid)]


def _check_references(runs: list[Run]) -> None:
    """Every `run:<id>` names a run of this grid that the run depends on (its `from` parent or a
    tuned-from run), so it is complete before the reference is resolved."""
    ids = [r.id for r in runs]
    for run in runs:
        for f, rid in references(run):
            if rid in run.deps:
                continue
            if rid in ids:
                why = "is a run of this grid that this run does not depend on (load it through `from`)"
            else:
                close = difflib.get_close_matches(rid, ids, n=1)
                why = "is not a run of this grid" + (f" (did you mean {close[0]!r}?)" if close else "")
            raise SpecError(f"stages.{run.stage}.spec.{f}", f"run:{rid} {why}")


def _validate_train(spec: RunSpec, path: str) -> None:
    # A compress run's base may be a `run:<id>` reference, resolved when it starts.
    spec.validate(path)


def load_grid(path: str | Path) -> Grid:
    """Read, validate and expand a grid YAML file."""
    p = Path(path)
    data = load_yaml(p)
    gs = from_dict(GridSpec, data, "grid")
    require(re.fullmatch(r"[A-Za-z0-9_.-]+", gs.name or "") is not None, "grid.name",
            "letters, digits, '.', '_' and '-' only")
    return expand(gs, p)
