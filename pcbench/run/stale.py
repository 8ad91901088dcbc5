"""Is a completed run still the result of its inputs? A run's result follows from its spec and from
two kinds of input the spec names only by reference: the runs it is tuned from (a `tune`d field takes
the value of the best of them) and the runs whose exported model it loads (`run:<id>`). A completed
run records both: `final.json` keeps `tuned` (field, value, from_run), and a run's record keeps
`inputs`, {run id: the digest of that run's export when it was loaded}.

A completed run is run again (`rerun_reason`) when its export is gone or damaged (a train run),
when its tuned value is no longer the best of the runs it is tuned from (a sweep gained a better
value), or when a run it loads was trained again since and exported other weights. Records of an
older pcbench without `inputs` are taken as current.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from pcbench.grid.fieldpath import field_value
from pcbench.spec.config import RunSpec, SpecError, from_dict
from pcbench.store import Store, parse_ref


StageOf = Optional[Callable[[str], str]]  # run id -> its stage (default: from the store's records)


def tuned_value(run: dict, store: Store, stage_of: StageOf = None) -> tuple[Any, Optional[str]]:
    """For a run with `tune`, the field's value from the best completed run it depends on."""
    tune = run.get("tune")
    if not tune:
        return None, None
    best, best_id = None, None
    for rid in tuned_from(run, store, stage_of):
        final = store.final(rid)
        if final is None:
            raise SpecError("tune", f"run {rid} of stage {tune['stage']} has not completed")
        metric = final.get(tune["metric"])
        if metric is None:
            raise SpecError("tune.metric", f"run {rid} has no metric {tune['metric']!r}")
        if metric == metric and (best is None or metric < best[0]):  # skip NaN
            spec = from_dict(RunSpec, store.run(rid)["spec"], f"run {rid}")
            best, best_id = (metric, field_value(spec, tune["field"], "tune.field")), rid
    if best is None:
        raise SpecError("tune", f"no finite {tune['metric']} among runs of stage {tune['stage']}")
    return best[1], best_id


def tuned_from(run: dict, store: Store, stage_of: StageOf = None) -> list[str]:
    """The runs a tuned run takes its value from: its dependencies of the tuned-from stage."""
    tune = run.get("tune")
    if not tune:
        return []
    stage_of = stage_of or (lambda rid: store.run(rid)["stage"])
    return [rid for rid in run["deps"] if stage_of(rid) == tune["stage"]]


def loaded(run: dict) -> list[str]:
    """The runs whose exported model `run` loads (`run:<id>`)."""
    spec = run.get("spec") or {}
    ref = spec.get("model") if run.get("kind") == "eval" else (spec.get("model") or {}).get("path")
    rid = parse_ref(ref)
    return [] if rid is None else [rid]


def input_digests(run: dict, store: Store) -> dict[str, Optional[str]]:
    """{run id: digest of its export} of the runs `run` loads, as they are now (what a run records
    as its `inputs` when it starts)."""
    return {rid: (store.final(rid) or {}).get("export_sha256") for rid in loaded(run)}


def tuned_change(run: dict, store: Store, final: Optional[dict] = None, stage_of: StageOf = None) -> Optional[str]:
    """How a completed tuned run's value differs from the best of its tuned-from runs now, or None
    (the same, not tuned, or not decidable: a tuned-from run has not completed or is not recorded)."""
    if not run.get("tune"):
        return None
    final = store.final(run["id"]) if final is None else final
    had = (final or {}).get("tuned")
    if not isinstance(had, dict):
        return None
    try:
        value, src = tuned_value(run, store, stage_of)
    except (SpecError, FileNotFoundError):
        return None
    if value == had.get("value") and src == had.get("from_run"):
        return None
    return (f"it ran with {had.get('field')} = {had.get('value')} (best of run {had.get('from_run')}); "
            f"the best is now {value} (run {src})")


def changed_inputs(run: dict, store: Store, record: Optional[dict]) -> Optional[str]:
    """Which run this completed run loaded was trained again since (its export's digest is not the
    one `record`'s `inputs` keeps), or None."""
    had = (record or {}).get("inputs")
    if not isinstance(had, dict):
        return None
    now = input_digests(run, store)
    changed = [rid for rid, digest in had.items() if rid in now and now[rid] != digest]
    if not changed:
        return None
    return f"run {changed[0]}, whose model it loaded, was trained again since"


def export_lost(store: Store, run_id: str) -> Optional[str]:
    """`damaged` or `gone` for a run whose exported model is not intact (`Store.export_problem`), else None."""
    problem = store.export_problem(run_id)
    return None if problem is None else "damaged" if "damaged" in problem else "gone"


def rerun_reason(store: Store, run: dict) -> Optional[str]:
    """Why a completed run must be run again, or None when its result stands (see the module)."""
    rid, kind = run["id"], run.get("kind")
    lost = export_lost(store, rid) if kind == "train" else None
    if lost is not None:
        return f"its exported model is {lost}"
    record = store.final(rid) if kind == "train" else store.eval_result(rid)
    return tuned_change(run, store, record) or changed_inputs(run, store, record)
