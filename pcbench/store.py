"""The results store: one directory of small records per run; heavy files in a work directory.

    <results>/<grid>/runs/<run_id>/run.json       what the run is (stage, labels, resolved spec, deps)
                                  status.json    state: pending | submitted | running | completed | failed
                                  metrics.jsonl  training curve
                                  recovery.jsonl PC: projection mass on pruned dimensions
                                  final.json     the final record (metric, held-out loss, cost, export path)
                                  eval.json      downstream scores (eval runs)
    <results>/<grid>/events.jsonl                append-only log of state changes (locked appends)
    <work>/<grid>/<run_id>/{ckpt/, model/, plan.json}

Every file is written atomically; appends are locked, so many array tasks can write at once.
Reports read this store and nothing else.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from pcbench.atomic import append_jsonl, read_json, read_jsonl, write_json
from pcbench.train import RunPaths

STATES = ("pending", "submitted", "running", "completed", "failed")


class Store:
    """Records of one grid under `root` (= <results>/<grid>), weights under `work` (= <work>/<grid>)."""

    def __init__(self, root: str | os.PathLike, work: str | os.PathLike):
        self.root = Path(root)
        self.work = Path(work)

    # -- paths -------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def paths(self, run_id: str) -> RunPaths:
        return RunPaths(record=self.run_dir(run_id), work=self.work / run_id)

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    # -- records -----------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        d = self.root / "runs"
        return sorted(p.name for p in d.iterdir() if (p / "run.json").exists()) if d.exists() else []

    def write_run(self, run: dict) -> None:
        """Record what a run is (idempotent: same content, same bytes)."""
        write_json(self.run_dir(run["id"]) / "run.json", run)

    def run(self, run_id: str) -> dict:
        return read_json(self.run_dir(run_id) / "run.json")

    def status(self, run_id: str) -> dict:
        p = self.run_dir(run_id) / "status.json"
        return read_json(p) if p.exists() else {"state": "pending"}

    def state(self, run_id: str) -> str:
        return self.status(run_id).get("state", "pending")

    def set_status(self, run_id: str, state: str, **fields: Any) -> dict:
        """Atomically replace the run's status (keeping its attempt count) and log an event."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        old = self.status(run_id)
        status = {"state": state, "time": time.time(), "host": socket.gethostname(),
                  "attempts": old.get("attempts", 0) + (1 if state == "running" else 0), **fields}
        for keep in ("job_id", "started", "executor"):
            if keep in old and keep not in status:
                status[keep] = old[keep]
        write_json(self.run_dir(run_id) / "status.json", status)
        append_jsonl(self.events, {"run": run_id, "state": state, "time": status["time"],
                                   **{k: v for k, v in fields.items() if k in ("job_id", "error")}})
        return status

    def fail(self, run_id: str, exc: BaseException, **fields: Any) -> dict:
        """Mark failed with the error message and the traceback's tail."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return self.set_status(run_id, "failed", error=f"{type(exc).__name__}: {exc}",
                               traceback=tb[-4000:], **fields)

    def final(self, run_id: str) -> Optional[dict]:
        p = self.paths(run_id).final
        return read_json(p) if p.exists() else None

    def eval_result(self, run_id: str) -> Optional[dict]:
        p = self.run_dir(run_id) / "eval.json"
        return read_json(p) if p.exists() else None

    def metrics(self, run_id: str) -> list[dict]:
        return read_jsonl(self.paths(run_id).metrics)

    def recovery(self, run_id: str) -> list[dict]:
        return read_jsonl(self.paths(run_id).recovery)

    def records(self) -> list[dict]:
        """Every run with its status and final record (what a report starts from)."""
        out = []
        for rid in self.run_ids():
            out.append({**self.run(rid), "status": self.status(rid), "final": self.final(rid),
                        "eval": self.eval_result(rid)})
        return out
