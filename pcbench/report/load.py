"""The results store of one grid -> tidy DataFrames. Reads `<results>/<grid>/` and nothing else, through
`pcbench.store.Store` (which owns the file layout and reads damaged records as absent, logging them):
a damaged run (even one whose run.json is unreadable) is a row of state `damaged`, its path in `error`.

    runs     one row per run (every state): id, stage, kind, state, error, label columns, and the
             standard columns method / compression / importance / tokens / seed / lr_used / base_id
             (from the labels where the grid made them axes, else from the run's resolved spec)
    train    completed train runs: the above + the final record (loss = train_loss_last100, ...)
    evals    completed eval runs: the above (labels inherited from the scored run) + average + per task
             task:<t> (primary metric), se:<t> (its recorded stderr), n:<t> (samples)
    events   the state-change log
    earlier  runs the grid no longer has (not in the store's grid.json: an earlier version of the
             grid, e.g. an lr edited in place), listed and counted nowhere else
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from pcbench.store import Store, parse_ref, read_lines

STANDARD = ["method", "compression", "importance", "tokens", "seed"]


@dataclass
class Study:
    """Everything a report needs from one grid's store."""

    grid: str
    root: Path
    runs: pd.DataFrame
    train: pd.DataFrame
    evals: pd.DataFrame
    events: pd.DataFrame
    labels: list[str] = field(default_factory=list)
    earlier: list[dict] = field(default_factory=list)  # runs of an earlier version of the grid: not counted

    def curves(self, run_ids: list[str]) -> pd.DataFrame:
        """metrics.jsonl of the given runs, long: run, step, tokens, loss, loss_avg, lr, ..."""
        return _long(run_ids, Store(self.root).metrics)

    def recovery(self, run_ids: list[str]) -> pd.DataFrame:
        """recovery.jsonl (PC runs), long: run, step, recovery/<axis>/<mean|max> (per-tensor detail dropped)."""
        df = _long(run_ids, Store(self.root).recovery)
        return df.drop(columns=[c for c in ("tensors",) if c in df.columns])


def _long(run_ids: list[str], read) -> pd.DataFrame:
    """One frame of the runs' JSON-lines records (`read(run_id)`), a `run` column first."""
    return pd.DataFrame([{"run": rid, **r} for rid in sorted(run_ids) for r in read(rid)])


def _get(d: Optional[dict], *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _run_row(run: dict, status: dict, final: Optional[dict]) -> dict:
    spec = run.get("spec") or {}
    labels = run.get("labels") or {}
    comp = spec.get("compress") if isinstance(spec, dict) else None
    train = _get(spec, "train") or {}
    path = _get(spec, "model", "path") if isinstance(_get(spec, "model"), dict) else _get(spec, "model")
    base_id = parse_ref(path)
    tokens = train.get("tokens")
    if tokens is None and train.get("steps") and train.get("batch_size"):
        tokens = train["steps"] * train["batch_size"] * (_get(spec, "data", "seq_len") or 0)
    derived = {
        "method": comp.get("method") if comp else ("pretrain" if run.get("kind") == "train" else None),
        "compression": _num(comp.get("compression")) if comp else math.nan,
        "importance": comp.get("importance") if comp else None,
        "tokens": _num(tokens),
        "seed": train.get("seed", 0),
    }
    row = {
        "id": run["id"], "stage": run.get("stage"), "kind": run.get("kind", "train"),
        "state": status.get("state", "pending"), "error": status.get("error"),
        "status_time": _num(status.get("time")), "started": _num(status.get("started")),
        "deps": ",".join(run.get("deps") or []), "base_id": base_id,
        "label_keys": ",".join(sorted(labels)),
        "model_name": _get(spec, "model", "name"),
        "spec_lr": _num(_get(spec, "optim", "lr")),
        "lr_used": _num(_get(final, "tuned", "value", default=_get(spec, "optim", "lr"))),
        "tuned_from": _get(final, "tuned", "from_run"),
        **derived,
    }
    for k, v in labels.items():
        row[k] = v
    for k in STANDARD:  # labels win (they are what the grid varied), else the spec's value
        if k in labels:
            row[k] = _num(labels[k]) if k in ("compression", "tokens") else labels[k]
    return row


def _final_fields(final: dict) -> dict:
    steps = final.get("steps") or 0
    return {
        "loss": _num(final.get("train_loss_last100")),
        "heldout": _num(final.get("heldout_loss")),
        "final_train_loss": _num(final.get("final_train_loss")),
        "final_kind": final.get("kind"),
        "steps": steps,
        "tokens_seen": _num(final.get("tokens")),
        "tokens_per_step": _num(final.get("tokens")) / steps if steps else math.nan,
        "train_seconds": _num(final.get("train_seconds")),
        "wall_seconds": _num(final.get("wall_seconds")),
        "tokens_per_s": _num(final.get("tokens_per_s")),
        "flops_per_token": _num(final.get("flops_per_token")),
        "fixed_flops_per_step": _num(final.get("fixed_flops_per_step", 0)),
        "train_flops": _num(final.get("train_flops")),
        "params": _num(_get(final, "model", "params", "total")),
        "base_params": _num(_get(final, "base", "params", "total")),
        "achieved": _num(_get(final, "plan", "achieved")),
        "d_model": _num(_get(final, "model", "d_model")),
        "d_ff": _num(_get(final, "model", "d_ff")),
    }


def load_study(results_root: Path, grid: str) -> Study:
    """Read `<results_root>/<grid>/` into a Study (every frame sorted by run id)."""
    store = Store(Path(results_root) / grid)  # records only: a report never asks for weights
    rows, finals, evals, label_names, earlier = [], {}, {}, set(), []
    current = store.grid_runs()  # None: not recorded, every run counts
    for run in store.records():  # a damaged run (records unreadable or not as sealed): state damaged
        rid, status = run["id"], run["status"]
        if current is not None and rid not in current:
            earlier.append({"id": rid, "stage": run.get("stage"), "state": status.get("state"),
                            "labels": run.get("labels") or {}})
            continue
        completed = status.get("state") == "completed"
        final = run["final"] if completed else None
        if completed and run.get("kind", "train") == "train" and final is None:
            status = {**status, "state": "damaged"}  # never counted completed without its record
        if status.get("state") == "damaged":  # named with its path, in the error column
            status = {**status, "error": status.get("problem") or status.get("error")}
        row = _run_row(run, status, final)
        label_names |= set((run.get("labels") or {}).keys())
        rows.append(row)
        if final is not None and row["kind"] == "train":
            finals[rid] = _final_fields(final)
        if completed and row["kind"] == "eval":
            if run["eval"] is not None:
                evals[rid] = run["eval"]
            else:
                row["state"] = "damaged"
    runs = pd.DataFrame(rows)
    if runs.empty:
        runs = pd.DataFrame(columns=["id", "stage", "kind", "state", "error", "base_id", *STANDARD, "lr_used"])
    train = _train_frame(runs, finals)
    return Study(grid=grid, root=store.root, runs=runs, train=train, evals=_eval_frame(runs, train, evals),
                 events=_events(store), labels=sorted(label_names), earlier=earlier)


def _train_frame(runs: pd.DataFrame, finals: dict[str, dict]) -> pd.DataFrame:
    t = runs[runs.id.isin(list(finals))].copy()
    f = pd.DataFrame.from_dict(finals, orient="index")
    t = t.join(f, on="id") if len(t) else t.reindex(columns=[*t.columns, *f.columns])
    # the base a compress run started from: its tokens per parameter, from the base's own record
    tpp = (t.tokens_seen / t.params).where(t.method == "pretrain") if len(t) else pd.Series(dtype=float)
    base_tpp = dict(zip(t.id, tpp))
    t["base_tpp"] = [base_tpp.get(b, math.nan) if isinstance(b, str) else math.nan for b in t.base_id] \
        if len(t) else []
    if "ratio" in t.columns:
        t["base_ratio"] = pd.to_numeric(t["ratio"], errors="coerce")
        t["base_ratio"] = t.base_ratio.where(t.base_ratio.notna(), t.base_tpp.round())
    else:
        t["base_ratio"] = t.base_tpp.round() if len(t) else []
    return t.sort_values("id").reset_index(drop=True)


def _eval_frame(runs: pd.DataFrame, train: pd.DataFrame, evals: dict[str, dict]) -> pd.DataFrame:
    rows = []
    by_id = {r["id"]: r for r in runs.to_dict("records")} if len(runs) else {}
    for rid, ev in sorted(evals.items()):
        r = dict(by_id[rid])
        parent = ev.get("parent") or (r["deps"].split(",")[0] if r.get("deps") else None)
        p = by_id.get(parent, {})
        for k in STANDARD:  # not inherited as labels: the scored run's own values
            if r.get(k) is None or (isinstance(r[k], float) and math.isnan(r[k])):
                r[k] = p.get(k)
        row = {**r, "parent": parent, "parent_stage": p.get("stage"),
               "average": _num(ev.get("average"))}
        for task, metric in sorted((ev.get("primary") or {}).items()):
            row[f"task:{task}"] = _num(_get(ev, "tasks", task, metric))
            row[f"se:{task}"] = _num(_get(ev, "tasks", task, f"{metric}_stderr"))  # NaN: not recorded
            row[f"n:{task}"] = _num(_get(ev, "samples", task))
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df) and len(train):
        df = df.merge(train[["id", "base_ratio", "base_tpp"]].rename(columns={"id": "parent"}), on="parent",
                      how="left")
    return df


def _events(store: Store) -> pd.DataFrame:
    ev = pd.DataFrame(read_lines(store.events))
    if ev.empty:
        return pd.DataFrame(columns=["run", "state", "time"])
    return ev.sort_values(["time", "run", "state"], kind="stable").reset_index(drop=True)


def open_study(grid: str | Path, results: Optional[str | Path] = None) -> Study:
    """The study of `grid` (a grid YAML, of which only `name` and `results_dir` are read, or a grid
    name) in the results root `results` (default: the grid's `results_dir`, else `results`), as
    `pcbench report` reads it. No torch; a missing store is one `SpecError` line."""
    from pcbench.spec.config import SpecError, load_yaml

    name, root = str(grid), results
    path = Path(grid)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        data = load_yaml(path) or {}
        name = (data.get("name") if isinstance(data, dict) else None) or path.stem
        if root is None and isinstance(data, dict):
            root = data.get("results_dir")
    root = Path(root or "results")
    if not (root / name / "runs").is_dir():
        raise SpecError("load_study", f"no results for grid {name!r} under {root}/ (run it first: pcbench run GRID)")
    return load_study(root, name)
