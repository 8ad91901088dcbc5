"""Trackers: a run's curves streamed to TensorBoard, Weights & Biases or MLflow, one registry.

`TRACKERS` maps each name a spec's `train.track` (and `--track`) accepts to its class; everything
that names trackers reads it (spec validation, the CLI's choices, the loop). A tracker gets, per run:
the resolved spec as its config, every metric line the loop writes (`metrics.jsonl`, and the
scalars of `recovery.jsonl` as `recovery/...`) at its step with its token count, and the final
record as its summary.

    tensorboard  event files in `<run work dir>/tensorboard/` (beside the run's checkpoints)
    wandb        project = the grid (or $WANDB_PROJECT), group = the grid, job_type = the stage,
                 name = the run id, files under `<run work dir>/wandb/`; resumable (a fixed id kept
                 in the run's tracking state); WANDB_MODE=offline works
    mlflow       $MLFLOW_TRACKING_URI, else a local file store `<grid work dir>/mlruns`; one
                 experiment per grid, run name = the run id

A resumed run continues the same tracker run: `<run work dir>/tracking.json` holds each tracker's
run id and the last step it was sent per stream, and a step at or below it is never sent again
(the loop resumes bit-exactly, so a step recomputed after a crash has the values already sent).

A tracker never fails or slows a run: every call into a tracker library runs in the trackers' own
process (`Session`: `python -m pcbench.tracking`, fed JSON lines by a thread of the training
process, so the loop only appends to a queue); a tracker that fails to start or to send prints one
warning line and is dropped for the rest of the run; at the end the loop waits at most
$PCBENCH_TRACK_TIMEOUT seconds (default 120) for the trackers to finish.

May import: `util` (no torch; the tracker libraries are imported in the trackers' process only).
Imported by `spec` (the names), `train` (the loop), `run` (jobs), `cli`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

STATE = "tracking.json"  # in the run's work directory
TIMEOUT = 120.0  # seconds the loop waits for the trackers at the end (`$PCBENCH_TRACK_TIMEOUT`)


def track_timeout() -> float:
    """`$PCBENCH_TRACK_TIMEOUT` in seconds (unset or empty: `TIMEOUT`); anything but a finite number
    >= 0 is refused as `SpecError` naming the variable (`run`, `train` and `compress` check it first)."""
    from pcbench.util.errors import SpecError

    text = os.environ.get("PCBENCH_TRACK_TIMEOUT", "").strip()
    if not text:
        return TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise SpecError("PCBENCH_TRACK_TIMEOUT", f"must be a number of seconds >= 0, not {text!r}")
    return value


def _timeout_or_default() -> float:
    """`track_timeout()`, or `TIMEOUT` with one warning line: a run that trained is never lost to it."""
    from pcbench.util.errors import SpecError

    try:
        return track_timeout()
    except SpecError as e:
        print(f"[pcbench] warning: {e}; waiting {TIMEOUT:.0f} s for the trackers", file=sys.stderr, flush=True)
        return TIMEOUT


@dataclass
class RunInfo:
    """Who a run is to its trackers."""

    name: str  # the run id: tracker run name
    stage: str  # wandb job_type
    work: Path  # the run's work directory: event files, wandb files, tracking state
    group: Optional[str] = None  # the grid: wandb project and group, MLflow experiment
    store: Optional[Path] = None  # where a default local MLflow store goes (default: `work`)

    @property
    def project(self) -> str:
        return self.group or "pcbench"


def warn(name: str, what: str, e: BaseException) -> None:
    """The one line a failing tracker costs."""
    why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    print(f"[pcbench] warning: tracker {name} {what} ({why}); the run goes on without it",
          file=sys.stderr, flush=True)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3} (lists and scalars are leaves)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record (bools and everything else left out), keys prefixed (once)."""
    return {k if k.startswith(prefix) else f"{prefix}{k}": float(v) for k, v in rec.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class Tracker:
    """One tracker of one run. `start` may raise (the session drops it with one warning line)."""

    name = ""

    def start(self, info: RunInfo, config: dict, state: dict) -> None:
        """Open (or reopen, `state` holding what an earlier start saved there) the tracker run."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Send `metrics` at `step`."""

    def summary(self, record: dict) -> None:
        """Send the final record."""

    def close(self, status: str) -> None:
        """Flush and close; `status`: finished | failed | interrupted."""


class TensorBoard(Tracker):
    """Event files written with TensorBoard's own writer (no torch, no TensorFlow)."""

    name = "tensorboard"

    def start(self, info, config, state):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.dir = info.work / "tensorboard"
        self.writer = EventFileWriter(str(self.dir))
        if not state.get("config"):
            self._text("config", json.dumps(config, sort_keys=True), 0)
            state["config"] = True

    def _event(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                              summary=summary_pb2.Summary(value=values)))

    def _text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        self._event(step, [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    def log(self, step, metrics):
        from tensorboard.compat.proto import summary_pb2

        self._event(step, [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()])

    def summary(self, record):
        self._text("final", json.dumps(record, sort_keys=True, default=str), int(record.get("steps") or 0))
        self.log(int(record.get("steps") or 0), scalars(record, "final/"))

    def close(self, status):
        self.writer.close()


class Wandb(Tracker):
    """A Weights & Biases run, resumed by its id (kept in the run's tracking state)."""

    name = "wandb"

    def start(self, info, config, state):
        import wandb

        if "id" not in state:  # unique per run and work directory: two stores of one grid never merge
            key = hashlib.sha256(str(info.work.resolve()).encode()).hexdigest()[:8]
            state["id"] = f"{info.name}-{key}"[-64:]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or info.project, group=info.group,
                              job_type=info.stage, name=info.name, id=state["id"], resume="allow",
                              dir=str(info.work), config=config, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def summary(self, record):
        self.run.summary.update(json.loads(json.dumps(record, default=str)))

    def close(self, status):
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MLflow(Tracker):
    """An MLflow run in the grid's experiment, through `MlflowClient` (no global active run)."""

    name = "mlflow"

    def start(self, info, config, state):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local store beside the grid's runs; MLflow keeps file stores behind a flag
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(info.store or info.work) / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if "run_id" in state:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(info.project)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            try:
                exp_id = self.client.create_experiment(info.project)
            except Exception:  # noqa: BLE001 - another run of the grid created it meanwhile
                exp_id = self.client.get_experiment_by_name(info.project).experiment_id
        run = self.client.create_run(exp_id, run_name=info.name,
                                     tags={"pcbench.stage": info.stage, "pcbench.group": info.project})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, json.dumps(config, indent=1, sort_keys=True), "spec.json")
        state["run_id"] = self.run_id

    def log(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def summary(self, record):
        self.client.log_text(self.run_id, json.dumps(record, indent=1, sort_keys=True, default=str), "final.json")
        self.log(int(record.get("steps") or 0), {k: v for k, v in scalars(record, "final.").items()
                                                  if math.isfinite(v)})

    def close(self, status):
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "interrupted": "KILLED"}.get(
            status, "FAILED"))


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, Wandb, MLflow)}


def names() -> list[str]:
    return list(TRACKERS)


def parse(text: str) -> list[str]:
    """`--track a,b` (or `none`) -> ["a", "b"]; an unknown name raises ValueError naming the choices."""
    items = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
    bad = [t for t in items if t not in TRACKERS]
    if bad:
        from pcbench.util.suggest import did_you_mean

        raise ValueError(f"unknown tracker {bad[0]!r}{did_you_mean(bad[0], TRACKERS)}; choose from "
                         f"{', '.join(TRACKERS)} (comma-separated), or none")
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# A run's trackers


_open: "weakref.WeakSet[Session]" = weakref.WeakSet()


class Session:
    """The trackers of one run, fed by the loop (`log`, `finish`) and served by their own process
    (`python -m pcbench.tracking`, so that neither their imports nor their sends take the training
    process's interpreter lock), which reads one JSON message a line from its stdin; a thread of
    this process writes them, so the loop only ever appends to a queue.

    Used as a context around the loop: leaving it by an exception closes the trackers (status
    `interrupted` for an `Interrupted`, else `failed`); `finish(record)` sends the summary and closes."""

    def __init__(self, names: list[str], info: Optional[RunInfo] = None, config: Optional[dict] = None):
        self.names = list(names)
        self.done = True
        if not self.names:
            return
        for other in list(_open):  # a session an earlier run in this process left open
            other.close("failed")
        root = str(Path(__file__).resolve().parents[1])  # this pcbench, whatever the child's sys.path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "pcbench.tracking"], stdin=subprocess.PIPE,
                                         stdout=2, env=env)  # its prints go to stderr: stdout stays ours
        except OSError as e:
            warn(", ".join(self.names), "could not start", e)
            return
        self.done = False
        self.queue: "queue.Queue" = queue.Queue()
        self.queue.put({"op": "start", "names": self.names, "config": config or {},
                        "info": {"name": info.name, "stage": info.stage, "work": str(info.work),
                                 "group": info.group, "store": str(info.store) if info.store else None}})
        self.writer = threading.Thread(target=self._write, name="pcbench-trackers", daemon=True)
        self.writer.start()
        _open.add(self)

    # the loop's side: never blocks, never raises

    def log(self, stream: str, rec: dict) -> None:
        """A metric line of `stream` (`metrics`, `recovery`) as the loop writes it (with `step`)."""
        if not self.done:
            self.queue.put({"op": "log", "stream": stream, "rec": rec})

    def finish(self, record: dict) -> None:
        """Send the final record and close (waits for the trackers, at most $PCBENCH_TRACK_TIMEOUT s)."""
        if not self.done:
            self.queue.put({"op": "summary", "record": record})
        self.close("finished")

    def close(self, status: str = "finished") -> None:
        if self.done:
            return
        self.done = True
        _open.discard(self)
        self.queue.put({"op": "close", "status": status})
        self.queue.put(None)
        timeout = _timeout_or_default()
        deadline = time.monotonic() + timeout
        self.writer.join(timeout)
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            print(f"[pcbench] warning: trackers {', '.join(self.names)} still busy after {timeout:.0f} s "
                  "($PCBENCH_TRACK_TIMEOUT); stopped, the run goes on without them", file=sys.stderr, flush=True)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            self.close("interrupted" if type(exc).__name__ == "Interrupted" else "failed")

    def _write(self) -> None:
        pipe = self.proc.stdin
        try:
            while True:
                msg = self.queue.get()
                if msg is None:
                    break
                pipe.write((json.dumps(msg, default=str) + "\n").encode())
                pipe.flush()
        except (OSError, ValueError):
            pass  # the trackers' process is gone: it said why on stderr
        finally:
            with contextlib.suppress(OSError, ValueError):
                pipe.close()


def serve(lines) -> None:
    """The trackers' process: the `start` message, then `log` / `summary` / `close` messages; end of
    input without `close` (the training process died) closes them as `failed`."""
    it = iter(lines)
    first = json.loads(next(it, "null") or "null")
    if not first or first.get("op") != "start":
        return
    i = first["info"]
    info = RunInfo(i["name"], i["stage"], Path(i["work"]), group=i.get("group"),
                   store=Path(i["store"]) if i.get("store") else None)
    state_path = info.work / STATE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    live: dict[str, Tracker] = {}
    for name in first["names"]:
        tracker, mine = TRACKERS[name](), state.setdefault(name, {})
        try:
            tracker.start(info, first["config"], mine)
            live[name] = tracker
        except Exception as e:  # noqa: BLE001 - one line, and the run goes on
            warn(name, "could not start", e)
    _save(state_path, state)
    closed = False
    for line in it:
        msg = json.loads(line)
        op = msg["op"]
        for name, tracker in list(live.items()):
            mine = state[name]
            try:
                if op == "log":
                    sent = mine.setdefault("steps", {})
                    step, stream = int(msg["rec"].get("step", 0)), msg["stream"]
                    if step <= sent.get(stream, -1):
                        continue  # sent before this run was resumed
                    tracker.log(step, scalars(msg["rec"], "" if stream == "metrics" else f"{stream}/"))
                    sent[stream] = step
                elif op == "summary":
                    tracker.summary(msg["record"])
                elif op == "close":
                    tracker.close(msg["status"])
            except Exception as e:  # noqa: BLE001
                warn(name, "could not close" if op == "close" else "could not send", e)
                del live[name]
                if op != "close":
                    with contextlib.suppress(Exception):
                        tracker.close("failed")
        _save(state_path, state)
        if op == "close":
            closed = True
            break
    if not closed:
        for tracker in live.values():
            with contextlib.suppress(Exception):
                tracker.close("failed")
        _save(state_path, state)


def _save(path: Path, state: dict) -> None:
    """The tracking state, replaced whole (a rename; no fsync: it is rewritten after every message)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, path)


@atexit.register
def _close_all() -> None:
    for s in list(_open):
        s.close("failed")


if __name__ == "__main__":
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # the training process decides; it closes our input
        signal.signal(sig, signal.SIG_IGN)
    serve(sys.stdin)
