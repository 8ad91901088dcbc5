"""The results store: one directory of small records per run; heavy files in a work directory.

    <results>/<grid>/runs/<run_id>/run.json       what the run is (stage, labels, resolved spec, deps)
                                  status.json    state: pending | submitted | running | completed | failed
                                                 | interrupted (SIGINT/SIGTERM/SIGHUP: resumable) | cancelled (SLURM)
                                  .lock          held by the one process that trains the run
                                  metrics.jsonl  training curve
                                  recovery.jsonl PC: projection mass on pruned dimensions
                                  final.json     the final record (metric, held-out loss, cost, export path)
                                  eval.json      downstream scores (eval runs)
    <results>/<grid>/events.jsonl                append-only log of state changes (locked appends)
    <results>/<grid>/grid.json                   the run ids the grid has now (sealed; `pcbench run`)
    <work>/<grid>/<run_id>/{ckpt/, model/, plan.json, owner.json}

A run's work state belongs to the records that started it: `status.json` keeps the run's `lineage`
(a random id drawn when its records first start it) and `owner.json` in its work directory names
the lineage, spec and data the state was made for (`claim_work`). State that belongs to other
records (a results dir deleted or restored, records deleted, the data changed under the same run
id) is moved aside to `<work>/<run_id>/.stale/<when>/`, never resumed. A completed run's export is
named by its final record (`lineage`, `export_sha256`) and checked when read back (`export_problem`).

The store owns this layout (`RunPaths`, `Store.paths`) and the `run:<id>` reference (a run's
exported model): `parse_ref` is its only parser, `Store.resolve_ref` turns it into the export path.

Every file is written atomically; appends are locked, so many array tasks can write at once.
Reports read this store and nothing else. Reading is tolerant: an unreadable (truncated, empty) record
is named once in a warning line (`pcbench: warning: damaged record PATH: why`), read as absent, and
`health` never calls such a run completed.

Records are sealed: `run.json` and `status.json` carry `seal`, the sha256 of the rest of the record
(`sealed`), and a completed run's `status.json` keeps the sha256 of each record the run wrote
(`records`: final.json, eval.json, metrics.jsonl, ...). A record whose seal or recorded sha256 does
not match is damaged (named with its path), never read as data. Records of an older pcbench, with
no seal, are read as they are (legacy); a `state` not in `STATES` is damage too.

May import: `spec`, `util` (torch-free). Imported by `grid`, `report`, `evaluate`, `train`, `run`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pcbench.util.atomic import OwnerLock, append_jsonl, lock_holder, read_jsonl, try_owner_lock, write_json
from pcbench.spec.config import SpecError
from pcbench.util.outputs import output_digest, verify_output
from pcbench.util.verify import Damaged, sha256_bytes, sha256_file, sha256_json, warn

# Every state of a run, in the order reports list them. `damaged` and `lost` are never written: readers
# derive them (`Store.health`: unreadable records; `liveness.Liveness`: its process or job is gone).
ALL_STATES = ("completed", "failed", "running", "submitted", "pending", "cancelled", "damaged", "interrupted", "lost")
DERIVED = ("damaged", "lost")
STATES = tuple(s for s in ALL_STATES if s not in DERIVED)  # what status.json may hold
ACTIVE = ("submitted", "running")  # a claim that a process or job works on the run (`Liveness` checks it)
RESUMABLE = ("pending", "submitted", "running", "interrupted", "cancelled", "damaged")  # rerun resumes
_warned: set[tuple] = set()

REF_PREFIX = "run:"
SEAL = "seal"  # a sealed record's own sha256 (of its canonical JSON without this key)
RECORDS = ("run.json", "final.json", "eval.json", "metrics.jsonl", "recovery.jsonl")  # digests kept on completion


def parse_ref(ref: Any) -> Optional[str]:
    """The run id of a `run:<id>` reference (a run's exported model), else None."""
    if isinstance(ref, str) and ref.startswith(REF_PREFIX):
        return ref[len(REF_PREFIX):]
    return None


def is_ref(ref: Any) -> bool:
    """Is `ref` a `run:<id>` reference?"""
    return parse_ref(ref) is not None


@dataclass
class RunPaths:
    """Where a run writes: small records (`record`, committed to git) and heavy files (`work`)."""

    record: Path
    work: Optional[Path]  # None: a reader of records only (the report), which never asks for weights
    export: Optional[Path] = None  # default: <work>/model

    @property
    def metrics(self) -> Path:
        return self.record / "metrics.jsonl"

    @property
    def recovery(self) -> Path:
        return self.record / "recovery.jsonl"

    @property
    def final(self) -> Path:
        return self.record / "final.json"

    @property
    def ckpt(self) -> Path:
        return self.work / "ckpt"

    @property
    def model(self) -> Path:
        return self.export or self.work / "model"

    @property
    def plan(self) -> Path:
        return self.work / "plan.json"

    @property
    def owner(self) -> Path:
        return self.work / "owner.json"


def new_lineage() -> str:
    """A fresh lineage id: what ties a run's work state to the records that started it."""
    return secrets.token_hex(8)


def stale_dir(work: Path) -> Path:
    """A new folder under `<work>/.stale/<when>/` for state or records set aside (never deleted)."""
    return work / ".stale" / time.strftime("%Y%m%d-%H%M%S", time.gmtime()) / secrets.token_hex(3)


def claim_work(paths: RunPaths, ident: dict, *, adopt: bool = False, say=None) -> Optional[Path]:
    """Make `paths.work` belong to `ident` (lineage, spec, data): state there that another identity
    left (`owner.json` differs, or is missing while there is state, unless `adopt`: records of an
    older pcbench that never wrote one) is moved aside to `<work>/.stale/<when>/` and named by one
    line through `say`. Returns where it went (None: nothing moved). Writes `owner.json`."""
    work = paths.work
    state = [p for p in (paths.ckpt, paths.plan, paths.model if paths.export is None else None)
             if p is not None and p.exists()]
    old = read_record(paths.owner) if paths.owner.exists() else None
    moved = None
    if state and old != ident and not (old is None and adopt):
        why = ("no owner recorded" if old is None else
               ", ".join(f"{k} differs" for k in sorted(set(old) | set(ident)) if old.get(k) != ident.get(k)))
        moved = stale_dir(work)
        moved.mkdir(parents=True)
        for p in state:
            os.replace(p, moved / p.name)
        if paths.owner.exists():
            os.replace(paths.owner, moved / paths.owner.name)
        if say is not None:
            say(f"{work}: state left by other records ({why}) moved aside to {moved}; "
                "not resumed, trained from the start")
    if old != ident or moved is not None:
        write_json(paths.owner, ident)
    return moved


def sealed(rec: dict) -> dict:
    """`rec` as it will read back, with its `seal` (see the module)."""
    rec = json.loads(json.dumps({k: v for k, v in rec.items() if k != SEAL}, default=str))
    return {**rec, SEAL: sha256_json(rec)}


def read_record(path: str | os.PathLike, problems: Optional[list[str]] = None,
                sha256: Optional[str] = None) -> Optional[dict]:
    """A JSON record, or None when it is absent or unreadable; an unreadable one is described in
    `problems` ("PATH: why") and named in one warning line once per process (per file version). A sealed record whose
    seal fails, or one whose bytes are not the `sha256` recorded for it, is unreadable; an unsealed
    one (an older pcbench's) is read as it is. The seal is not part of the record returned."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        why = f"unreadable ({e.strerror})"
    else:
        try:
            rec = json.loads(data.decode("utf-8"))
            if sha256 is not None and sha256_bytes(data) != sha256:
                why = "sha256 mismatch: not the record written when the run completed"
            elif not isinstance(rec, dict):
                why = "not a JSON object"
            elif SEAL in rec and rec.pop(SEAL) != sha256_json(rec):
                why = "sha256 mismatch: changed since pcbench wrote it"
            else:
                return rec
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            why = "empty" if not data.strip() else f"truncated or invalid JSON ({getattr(e, 'msg', e)})"
    _damaged(path, why, problems)
    return None


def read_lines(path: str | os.PathLike, problems: Optional[list[str]] = None,
               sha256: Optional[str] = None) -> list[dict]:
    """A JSON-lines record; unreadable lines are skipped, described in `problems` and named once.
    A file that is not the `sha256` recorded for it reads as no lines (and is described)."""
    if sha256 is not None and _digest(Path(path)) != sha256:
        _damaged(Path(path), "sha256 mismatch: not the record written when the run completed", problems)
        return []
    found: list[str] = []
    out = read_jsonl(path, found)
    for why in found:
        _damaged(Path(path), why, problems)
    return out


def _digest(path: Path) -> Optional[str]:
    """The sha256 of a small record (None: absent or unreadable)."""
    try:
        return sha256_file(path, cache=False)
    except OSError:
        return None


def brief(problem: Optional[str]) -> str:
    """`/long/path/final.json: why` -> `final.json (why)` (the full path is logged once)."""
    path, _, why = (problem or "record").partition(": ")
    return f"{Path(path).name} ({why})" if why else Path(path).name


def _damaged(path: Path, why: str, problems: Optional[list[str]]) -> None:
    msg = f"{path}: {why}"
    if problems is not None:
        problems.append(msg)
    try:
        st = path.stat()
        key = (str(path), why, st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(path), why)
    if key not in _warned:
        _warned.add(key)
        warn(f"damaged record {msg}")


class Store:
    """Records of one grid under `root` (= <results>/<grid>), weights under `work` (= <work>/<grid>;
    None: a reader of the records only, e.g. the report)."""

    def __init__(self, root: str | os.PathLike, work: Optional[str | os.PathLike] = None):
        self.root = Path(root)
        self.work = Path(work) if work is not None else None

    # -- paths -------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def paths(self, run_id: str) -> RunPaths:
        return RunPaths(record=self.run_dir(run_id), work=self.work / run_id if self.work is not None else None)

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def grid_file(self) -> Path:
        return self.root / "grid.json"

    def write_grid_runs(self, run_ids: list[str]) -> None:
        """Record (sealed, atomically) which runs the grid has now: a report counts only those."""
        from pcbench.util.verify import write_sealed_json

        write_sealed_json(self.grid_file, {"runs": sorted(run_ids)})

    def grid_runs(self) -> Optional[set[str]]:
        """The run ids the grid had when `pcbench run` last ran it (None: not recorded, e.g. an older
        pcbench's store, or grid.json damaged: named in one warning line)."""
        from pcbench.util.verify import read_sealed_json, warn

        try:
            rec = read_sealed_json(self.grid_file, "the grid's run list")
        except FileNotFoundError:
            return None
        except (OSError, Damaged) as e:
            warn(f"{e}; every run in the store is counted")
            return None
        runs = rec.get("runs") if isinstance(rec, dict) else None
        return set(runs) if isinstance(runs, list) else None

    # -- records -----------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        d = self.root / "runs"
        return sorted(p.name for p in d.iterdir() if (p / "run.json").exists()) if d.exists() else []

    def write_run(self, run: dict) -> None:
        """Record what a run is, sealed (idempotent: same content, same bytes)."""
        write_json(self.run_dir(run["id"]) / "run.json", sealed(run))

    def run(self, run_id: str) -> dict:
        p = self.run_dir(run_id) / "run.json"
        rec = read_record(p, sha256=self._recorded(run_id, "run.json"))
        if rec is None:
            raise FileNotFoundError(f"{p}: missing or damaged run record (rerun `pcbench run` to rewrite it)")
        return rec

    def status(self, run_id: str) -> dict:
        """The run's status; a damaged status.json (unreadable, its seal broken, a state not in
        `STATES`) reads as state `damaged` with `problem`."""
        p = self.run_dir(run_id) / "status.json"
        problems: list[str] = []
        st = read_record(p, problems)
        if st is None:
            return {"state": "damaged", "problem": problems[0]} if problems else {"state": "pending"}
        if st.get("state", "pending") not in STATES:
            _damaged(p, f"unknown state {st.get('state')!r}", problems)
            return {"state": "damaged", "problem": problems[0]}
        return st

    def _recorded(self, run_id: str, name: str) -> Optional[str]:
        """The sha256 of record `name` kept when the run completed (None: none kept, e.g. legacy)."""
        records = self.status(run_id).get("records")
        return records.get(name) if isinstance(records, dict) else None

    def _digests(self, run_id: str) -> dict[str, str]:
        """{record name: sha256} of the records the run has now (`RECORDS`)."""
        d = self.run_dir(run_id)
        return {n: h for n in RECORDS if (h := _digest(d / n)) is not None}

    def state(self, run_id: str) -> str:
        return self.status(run_id).get("state", "pending")

    def set_status(self, run_id: str, state: str, **fields: Any) -> dict:
        """Atomically replace the run's status (keeping its attempt count) and log an event."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        old = self.status(run_id)
        if old.get("state") == "damaged":
            old = {}
        status = {"state": state, "time": time.time(), "host": socket.gethostname(),
                  "attempts": old.get("attempts", 0) + (1 if state == "running" else 0), **fields}
        for keep in ("job_id", "started", "executor", "lineage"):
            if keep in old and keep not in status:
                status[keep] = old[keep]
        if state == "completed":  # what the run wrote, checked whenever it is read back
            status["records"] = self._digests(run_id)
        write_json(self.run_dir(run_id) / "status.json", sealed(status))
        append_jsonl(self.events, {"run": run_id, "state": state, "time": status["time"],
                                   **{k: v for k, v in fields.items() if k in ("job_id", "error")}})
        return status

    def fail(self, run_id: str, exc: BaseException, **fields: Any) -> dict:
        """Mark failed with the error message and the traceback's tail."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return self.set_status(run_id, "failed", error=f"{type(exc).__name__}: {exc}",
                               traceback=tb[-4000:], **fields)

    def final(self, run_id: str, problems: Optional[list[str]] = None) -> Optional[dict]:
        return read_record(self.paths(run_id).final, problems, self._recorded(run_id, "final.json"))

    def eval_result(self, run_id: str, problems: Optional[list[str]] = None) -> Optional[dict]:
        return read_record(self.run_dir(run_id) / "eval.json", problems, self._recorded(run_id, "eval.json"))

    def metrics(self, run_id: str, problems: Optional[list[str]] = None) -> list[dict]:
        return read_lines(self.paths(run_id).metrics, problems, self._recorded(run_id, "metrics.jsonl"))

    def recovery(self, run_id: str, problems: Optional[list[str]] = None) -> list[dict]:
        return read_lines(self.paths(run_id).recovery, problems, self._recorded(run_id, "recovery.jsonl"))

    def resolve_ref(self, ref: str, field: str) -> str:
        """`run:<id>` -> the export directory of that (completed) run; anything else unchanged.
        A run without an export, or whose export is gone, raises `SpecError(field, ...)`."""
        rid = parse_ref(ref)
        if rid is None:
            return ref
        final = self.final(rid)
        if final is None or "export_path" not in final:
            raise SpecError(field, f"run {rid} has no exported model yet (state: {self.state(rid)})")
        path = final["export_path"]
        if not os.path.isdir(path):
            raise SpecError(field, f"export of run {rid} is missing at {path}")
        problem = self.export_check(rid, final)
        if isinstance(problem, Damaged):
            raise problem
        if problem is not None:
            raise SpecError(field, f"export of run {rid} at {path}: {problem}")
        return path

    def export_check(self, run_id: str, final: Optional[dict] = None):
        """None when the completed run's exported model is there and is the one its final record
        names (its files' sha256, its lineage); else what is wrong: a `Damaged` error for bytes that
        are not what was recorded, a string for anything else (gone, written by other records)."""
        final = final if final is not None else self.final(run_id)
        path = (final or {}).get("export_path")
        if not path:
            return "no exported model recorded"
        p = Path(path)
        what = f"export of run {run_id}"
        if not (p / "config.json").is_file():
            if os.path.lexists(p / "config.json"):
                return Damaged(p / "config.json", "not a file", what)
            return f"gone from {p}"
        try:
            marker = verify_output(p, what)
        except Damaged as e:
            return e
        want = final.get("export_sha256")
        if want is not None and output_digest(marker) != want:
            return Damaged(p / ".pcbench.json", "sha256 mismatch: not the files its final record names", what)
        lin, have = final.get("lineage"), (marker or {}).get("lineage")
        if lin is not None and have is not None and lin != have:
            return f"written by other records (lineage {have}, its record's {lin})"
        return None

    def export_here(self, final: Optional[dict]) -> bool:
        """Was the export this final record names made in this store's work directory (so a rerun
        here rebuilds it)? False for records from elsewhere (git, another clone or results dir)."""
        path = (final or {}).get("export_path")
        if not path or self.work is None:
            return False
        return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(self.work)))

    def export_problem(self, run_id: str, final: Optional[dict] = None) -> Optional[str]:
        """`export_check` as one string (None: the export is intact)."""
        problem = self.export_check(run_id, final)
        return None if problem is None else str(problem)

    def health(self, run_id: str, kind: Optional[str] = None) -> tuple[str, Optional[str]]:
        """(state, problem) as a reader should believe it: `damaged` (with the path and what is wrong)
        when status.json is unreadable or a `completed` run's final.json / eval.json is unreadable or
        missing (`kind`: train | eval, else read from run.json). A damaged run is rerun (resumed)."""
        st = self.status(run_id)
        state = st.get("state", "pending")
        if state == "damaged":
            return state, st.get("problem")
        problems: list[str] = []
        run = read_record(self.run_dir(run_id) / "run.json", problems, self._recorded(run_id, "run.json"))
        if problems:
            return "damaged", problems[0]
        if state != "completed":
            return state, None
        final, ev = self.final(run_id, problems), self.eval_result(run_id, problems)
        lines = self.metrics(run_id, problems)
        self.recovery(run_id, problems)
        if problems:
            return "damaged", problems[0]
        kind = kind or (run or {}).get("kind")
        need = {"train": (final, "final.json"), "eval": (ev, "eval.json")}.get(kind or "")
        if need is not None and need[0] is None:
            return "damaged", f"{self.run_dir(run_id) / need[1]}: missing for a completed run"
        metrics = self.paths(run_id).metrics
        if kind == "train" and (final or {}).get("steps") and metrics.exists() and not lines:
            return "damaged", f"{metrics}: no metrics for a completed run of {final['steps']} steps"
        return "completed", None

    # -- the lock of the process that trains a run -------------------------------------------
    def lock_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / ".lock"

    def try_lock(self, run_id: str, wait_s: float = 1.0) -> Optional[OwnerLock]:
        """Take the run's lock (None while a live process holds it); held while the run trains."""
        return try_owner_lock(self.lock_path(run_id), wait_s)

    def lock_holder(self, run_id: str) -> Optional[dict]:
        """{pid, host, since} of the live process training the run, or None."""
        return lock_holder(self.lock_path(run_id))

    def records(self) -> list[dict]:
        """Every run with its status and final record (what a report starts from). The status is
        `Store.health`'s: a damaged run (its `problem` named with the path) has state `damaged`, its
        records not read as data; one whose run.json is damaged is `{"id", "damaged": True, ...}`."""
        out = []
        for rid in self.run_ids():
            state, problem = self.health(rid)
            status = self.status(rid)
            if state == "damaged":
                status = {**status, "state": "damaged", "problem": problem}
            run = read_record(self.run_dir(rid) / "run.json", None, self._recorded(rid, "run.json"))
            if run is None:
                out.append({"id": rid, "damaged": True, "status": status, "final": None, "eval": None})
                continue
            ok = state != "damaged"
            out.append({**run, "status": status, "final": self.final(rid) if ok else None,
                        "eval": self.eval_result(rid) if ok else None})
        return out
