"""Grid expansion: stages x axes -> concrete runs, their ids and their dependency DAG.

Stages expand in dependency order (`schema.stage_order`). A stage's runs are, for each parent run
of its `from` stage that matches `where` (one empty parent without `from`), the product of its
axes, less the `exclude`d combinations. A run's labels are its parent's labels and its axis values;
its spec is the grid's `defaults` (train stages) merged with the stage's `spec` and each matching
`overrides.set`, then templated (`templates.py`) over the labels, `params` (the model's exact
parameter count, without torch) and `parent` (`parent.id`, `parent.spec...`), and typed and
validated as a `RunSpec` / `EvalSpec`. A `tune`d run also depends on every run of the tuned-from
stage sharing its `match` labels; its `tune.field` must name a field of its spec (the value is
patched into the typed spec when the run starts, `fieldpath.with_field` from `jobs.py`).

Run ids are `<stage>-<hash>` of the resolved spec's non-default fields, so adding an axis value or
editing another stage never renames existing runs. Every `run:<id>` a spec loads must name a run
it depends on.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from pcbench.spec.config import DataSpec, EvalSpec, ModelSpec, RunSpec, SpecError, from_dict, require, to_dict
from pcbench.grid.fieldpath import field_value
from pcbench.grid.schema import Grid, GridSpec, Resources, Run, StageSpec, parse_stages, read_grid_spec, stage_order
from pcbench.grid.selection import label_matches, matches
from pcbench.grid.templates import substitute, template_names
from pcbench.spec.presets import param_count, resolved_preset, vocab_size_for
from pcbench.store import parse_ref
from pcbench.util.suggest import did_you_mean

def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base` (mappings recursively, everything else replaced)."""
    out = _copy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = _copy(v)
    return out


_IMMUTABLE = (str, int, float, bool, type(None))


def _copy(v: Any) -> Any:
    """`copy.deepcopy` of parsed YAML, fast on its plain mappings, lists and scalars."""
    if isinstance(v, _IMMUTABLE):
        return v
    if type(v) is dict:
        return {k: _copy(x) for k, x in v.items()}
    if type(v) is list:
        return [_copy(x) for x in v]
    return copy.deepcopy(v)


def identity(obj: Any) -> Any:
    """The parts of a spec that differ from their defaults (nested). Hashing this instead of the
    whole spec keeps run ids stable when a new field with a neutral default is added. A field marked
    `metadata={"identity": False}` (where a run reports, e.g. `train.track`) is never part of it."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out = {}
    for f, default, default_id in _defaults(type(obj)):
        if f.metadata.get("identity") is False:
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            sub = identity(v)
            if default is dataclasses.MISSING or not dataclasses.is_dataclass(default) or sub != default_id:
                out[f.name] = sub
        elif v != default:
            out[f.name] = v
    return out


@functools.lru_cache(maxsize=None)
def _defaults(cls: type) -> tuple:
    """(field, its default or MISSING, `identity` of a dataclass default) of each field of `cls`
    (computed once per class: a grid hashes thousands of specs)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append((f, default, identity(default) if dataclasses.is_dataclass(default) else None))
    return tuple(out)


def run_id(stage: str, kind: str, spec: Any, tune: Optional[dict]) -> str:
    """Stable id: the stage name and a hash of the resolved spec's non-default fields (resources
    excluded)."""
    blob = json.dumps({"kind": kind, "spec": identity(spec), "tune": tune}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


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


def _ns(d: Any) -> Any:
    if isinstance(d, dict):
        return SimpleNamespace(**{k: _ns(v) for k, v in d.items()})
    return d


def _check_axes_used(name: str, st: StageSpec) -> None:
    used = template_names(st.spec) | {k for o in st.overrides for k in o.when} | \
        {k for e in st.exclude for k in e} | set(st.tune.match if st.tune else [])
    used |= {n for o in st.overrides for n in template_names(o.set)} | template_names(st.hours)
    for axis in st.axes:
        if axis not in used:
            raise SpecError(f"stages.{name}.axes.{axis}", "axis is not used by the stage's spec, overrides or "
                            f"exclude{did_you_mean(axis, sorted(used))}")


def expand(gs: GridSpec, source: Optional[Path] = None) -> Grid:
    """All runs of the grid, in dependency order; every spec validated before anything runs."""
    stages = parse_stages(gs)
    base_res = from_dict(Resources, gs.resources, "resources")
    base_res.validate("resources")

    runs: list[Run] = []
    by_stage: dict[str, list[Run]] = {}
    parent_specs: dict[str, SimpleNamespace] = {}
    for name in stage_order(stages):
        st = stages[name]
        path = f"stages.{name}"
        res = from_dict(Resources, deep_merge(to_dict(base_res), st.resources), f"{path}.resources")
        res.validate(f"{path}.resources")
        parents: list[Optional[Run]] = [None]
        if st.source:
            parents = [p for p in by_stage[st.source] if matches(p.labels, st.where)]
            require(bool(parents), f"{path}.where", f"no run of stage {st.source!r} matches {st.where}")
        axis_names = list(st.axes)
        out: list[Run] = []
        for parent in parents:
            for combo in itertools.product(*(st.axes[a] for a in axis_names)):
                labels = {**(parent.labels if parent else {}), **dict(zip(axis_names, combo))}
                if any(matches(labels, e) for e in st.exclude):
                    continue
                raw = st.spec
                for o in st.overrides:
                    if matches(labels, o.when):
                        raw = deep_merge(raw, o.set)
                base = gs.defaults if st.kind == "train" else {}
                merged = deep_merge(base, raw)
                ctx: dict[str, Any] = dict(labels)
                if parent is not None:
                    if parent.id not in parent_specs:  # once per parent, not per child (only read)
                        parent_specs[parent.id] = _ns(to_dict(parent.spec))
                    ctx["parent"] = SimpleNamespace(id=parent.id, stage=parent.stage, labels=_ns(parent.labels),
                                                    spec=parent_specs[parent.id], **{
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
                    if st.kind == "train":  # the field the run takes from its sweep exists on its spec
                        field_value(spec, st.tune.field, f"{path}.tune.field")
                    tuned = [r.id for r in by_stage[st.tune.stage]
                             if all(label_matches(r.labels, k, [labels.get(k)]) for k in st.tune.match)]
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
                why = "is not a run of this grid" + did_you_mean(rid, ids)
            raise SpecError(f"stages.{run.stage}.spec.{f}", f"run:{rid} {why}")


def _validate_train(spec: RunSpec, path: str) -> None:
    # A compress run's base may be a `run:<id>` reference, resolved when it starts.
    spec.validate(path)


def load_grid(path: str | Path) -> Grid:
    """Read, validate and expand a grid YAML file."""
    return expand(read_grid_spec(path), Path(path))
