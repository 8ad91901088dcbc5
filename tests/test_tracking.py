"""Trackers (issue 24): each tracker read back with its own client for runs that were interrupted and
resumed (every logged step once, the config equal to the run's spec, the final record as summary);
a tracker that fails leaves the run's records as they are without it; `train.track` never renames
a run."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml

from pcbench import tracking
from pcbench.spec.config import RunSpec, SpecError, load_run_spec, to_dict
from pcbench.store import RunPaths

ROOT = Path(__file__).resolve().parents[1]
# Timings, and the export's digest: its model card holds the run's spec, which names the trackers.
TIMINGS = ("seconds", "tokens_per_s", "train_seconds", "wall_seconds", "export_path", "memory_per_rank",
           "peak_memory_bytes", "peak_rss_bytes", "export_sha256")


def tiny_spec(steps: int = 12, **train) -> RunSpec:
    return load_run_spec({
        "model": {"name": "gpt2-nano"},
        "data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32, "eval_batches": 1},
        "optim": {"lr": 0.01, "warmup": 2},
        "train": {"steps": steps, "batch_size": 4, "threads": 1, "log_every": 2, "ckpt_every": 4,
                  "device": "cpu", **train}})


def stop_at(n: int):
    """`loop._stop_requested` answering yes after the n-th step of this process's run."""
    calls = {"n": 0}

    def stop(env):
        calls["n"] += 1
        return calls["n"] >= n
    return mock.patch("pcbench.train.loop._stop_requested", stop)


def crash_after(paths: RunPaths, step: int) -> None:
    """Drop the checkpoint at `step`: the rerun resumes from the one before, as after a SIGKILL that
    came after the lines up to `step` were logged, and logs those steps again."""
    import shutil

    shutil.rmtree(paths.ckpt / f"step_{step:08d}")


def interrupted_then_resumed(paths: RunPaths, spec: RunSpec, stop: int, **kw) -> dict:
    from pcbench.train import interrupts
    from pcbench.train.loop import train

    with stop_at(stop), pytest.raises(interrupts.Interrupted):
        train(spec, paths, progress=False, **kw)
    crash_after(paths, stop)
    return train(spec, paths, progress=False, **kw)


def metric_steps(paths: RunPaths) -> list[int]:
    return [json.loads(ln)["step"] for ln in paths.metrics.read_text().splitlines()]


def tensorboard_scalars(d: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing import event_accumulator

    ea = event_accumulator.EventAccumulator(str(d), size_guidance={"scalars": 0, "tensors": 0},
                                            purge_orphaned_data=False)  # a step written twice would show
    ea.Reload()
    out = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    out["text"] = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(tag)]
                   for tag in ea.Tags()["tensors"]}
    return out


# ---------------------------------------------------------------------------------------------
# default suite


def test_tensorboard_resumed_run_sends_each_step_once(tmp_path):
    """Interrupted at step 10, its last checkpoint lost (resumes from 8 and recomputes 10): the event
    files hold every logged step once, the spec as config and the final record as summary."""
    pytest.importorskip("tensorboard")
    spec = tiny_spec(track=["tensorboard"])
    paths = RunPaths(tmp_path / "record", tmp_path / "work")
    final = interrupted_then_resumed(paths, spec, stop=10)
    assert final["resumed_from"] == 8
    lines = [json.loads(ln) for ln in paths.metrics.read_text().splitlines()]
    tb = tensorboard_scalars(paths.work / "tensorboard")
    assert [s for s, _ in tb["loss"]] == [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12]
    assert [v for _, v in tb["loss"]] == pytest.approx([r["loss"] for r in lines], rel=1e-6)  # float32 in events
    assert [v for _, v in tb["tokens"]] == [r["tokens"] for r in lines]
    (config,) = tb["text"]["config"]
    assert json.loads(config[1]) == to_dict(spec)
    assert tb["final/train_loss_last100"][0][1] == pytest.approx(final["train_loss_last100"], rel=1e-6)
    assert json.loads(tb["text"]["final"][0][1])["train_loss_last100"] == final["train_loss_last100"]
    state = json.loads((paths.work / tracking.STATE).read_text())
    assert state["tensorboard"]["steps"] == {"metrics": 12}


def test_a_tracker_that_fails_to_start_changes_nothing(tmp_path, capfd, monkeypatch):
    """MLflow refusing its tracking URI at start: one warning line; metrics.jsonl and final.json
    (timings aside) as without any tracker."""
    pytest.importorskip("mlflow")
    from pcbench.train.loop import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch-scheme://nowhere")
    records = {}
    for name, track in (("plain", []), ("refused", ["mlflow"])):
        paths = RunPaths(tmp_path / name / "record", tmp_path / name / "work")
        train(tiny_spec(steps=6, track=track), paths, progress=False)
        strip = lambda r: {k: v for k, v in r.items() if k not in TIMINGS}  # noqa: E731
        records[name] = ([strip(json.loads(ln)) for ln in paths.metrics.read_text().splitlines()],
                         strip(json.loads(paths.final.read_text())))
    assert records["refused"] == records["plain"]
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if "tracker" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("[pcbench] warning: tracker mlflow could not start (") \
        and warnings[0].endswith("; the run goes on without it"), err


def test_track_is_not_part_of_run_ids(tmp_path):
    """Adding `train.track` (default, set in the grid, or by `--track`) renames no run: the ids of the
    committed studies are their store's."""
    from pcbench.cli import _track_grid
    from pcbench.grid import load_grid

    for name in ("default", "mini"):
        grid = load_grid(ROOT / "experiments" / f"{name}.yaml")
        have = {p.name for p in (ROOT / "results" / name / "runs").iterdir()}
        ids = [r.id for r in grid.runs]
        assert set(ids) == have, name
        _track_grid(grid, ["wandb", "mlflow"])
        assert [r.id for r in grid.runs] == ids
        assert all(r.spec.train.track == ["wandb", "mlflow"] for r in grid.runs if r.kind == "train")
        g = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
        g.setdefault("defaults", {}).setdefault("train", {})["track"] = ["tensorboard"]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(g, sort_keys=False))
        assert [r.id for r in load_grid(tmp_path / f"{name}.yaml").runs] == ids


def test_bad_tracker_is_one_line(tmp_path):
    from test_cli_errors import cli, refused

    with pytest.raises(SpecError, match=r"spec.train.track\[0\]: unknown tracker 'tensorbord'; choose from "
                                        r"tensorboard, wandb, mlflow"):
        load_run_spec({"train": {"steps": 1, "track": ["tensorbord"]}})
    for cmd in (["run", "experiments/mini.yaml", "--dry-run"], ["train", "x.yaml", "--out", str(tmp_path)],
                ["compress", "--base", "x", "--method", "pc", "--compression", "0.5", "--steps", "0",
                 "--out", str(tmp_path)]):
        rc, _, err = cli(*cmd, "--track", "nosuch")
        refused(rc, err, "--track", "unknown tracker 'nosuch'", "tensorboard, wandb, mlflow")


# ---------------------------------------------------------------------------------------------
# every tracker on a grid (slow: wandb and MLflow start up in seconds each)


def wandb_records(path: Path):
    """The records of a `.wandb` file (LevelDB log format: 32 KiB blocks of chunks with a 7-byte
    header each, after a 7-byte file header), parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, buf = 7, 32768, b""
    while pos < len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_run(work: Path) -> dict:
    """What the offline run files of one pcbench run hold: runs (one per start), history, config, summary."""
    runs, history, summary = [], [], {}
    for f in sorted(work.glob("wandb/offline-run-*/run-*.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                runs.append({"id": r.run.run_id, "name": r.run.display_name, "project": r.run.project,
                             "group": r.run.run_group, "job_type": r.run.job_type,
                             "config": {_key(i): json.loads(i.value_json) for i in r.run.config.update}})
            elif kind == "history":
                history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return {"runs": runs, "history": history, "summary": summary}


@pytest.mark.slow
def test_every_tracker_on_a_grid_with_a_resumed_run(tmp_path, monkeypatch):
    """A tiny grid (base -> hpr, pc) streaming to all three trackers from its defaults, its base
    interrupted at step 10 and resumed from step 8: each tracker, read with its own client, holds
    every logged step of every run once, the run's resolved spec as config and its final record."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from pcbench.grid import load_grid
    from pcbench.run import launch
    from pcbench.run.jobs import RunJob, resolved_train_spec
    from pcbench.train import interrupts
    from test_launch import tiny_grid

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    path = tiny_grid(tmp_path, name="tracked", base_steps=12)
    g = yaml.safe_load(path.read_text())
    g["defaults"]["train"].update(log_every=2, ckpt_every=4, track=["tensorboard", "wandb", "mlflow"])
    g["stages"]["compress"]["spec"]["train"]["steps"] = 6
    g["stages"]["compress"]["spec"]["compress"]["recovery_every"] = 3
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    launch._prepare(store, grid)
    base = next(r.id for r in grid.runs if r.stage == "base")
    with stop_at(10), pytest.raises(interrupts.Interrupted):
        RunJob(str(store.root), str(store.work), base, progress=False)()
    assert store.state(base) == "interrupted"
    crash_after(store.paths(base), 10)
    t0 = time.perf_counter()
    for run in grid.runs:
        RunJob(str(store.root), str(store.work), run.id, progress=False)()
    print(f"grid with three trackers: {time.perf_counter() - t0:.1f} s")

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow keeps file stores behind this flag
    client = MlflowClient((store.work / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("tracked")
    mlruns = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(mlruns) == {r.id for r in grid.runs}  # one experiment for the grid, one run per run
    for run in grid.runs:
        paths = store.paths(run.id)
        final = store.final(run.id)
        spec = to_dict(resolved_train_spec(store.run(run.id), store)[0])
        steps = metric_steps(paths)
        lines = {r["step"]: r for r in store.metrics(run.id)}
        assert steps == sorted(set(steps)) and steps[-1] == final["steps"]
        rec_steps = [r["step"] for r in store.recovery(run.id)]
        if run.id == base:
            assert final["resumed_from"] == 8 and steps == [2, 4, 6, 8, 10, 12]

        tb = tensorboard_scalars(paths.work / "tensorboard")
        assert [s for s, _ in tb["loss"]] == steps, run.id
        assert json.loads(tb["text"]["config"][0][1]) == spec
        if rec_steps:
            assert [s for s, _ in tb["recovery/d_model/mean"]] == rec_steps

        w = wandb_run(paths.work)
        assert len(w["runs"]) == (2 if run.id == base else 1)  # resumed: the same run started again
        assert {r["id"] for r in w["runs"]} == {w["runs"][0]["id"]}
        assert {(r["name"], r["project"], r["group"], r["job_type"]) for r in w["runs"]} == \
            {(run.id, "tracked", "tracked", run.stage)}
        config = {k: v for k, v in w["runs"][0]["config"].items() if not k.startswith("_")}
        assert config == spec
        logged = [h["_step"] for h in w["history"] if "loss" in h]
        assert logged == steps, run.id
        assert all(h["loss"] == lines[h["_step"]]["loss"] for h in w["history"] if "loss" in h)
        assert len({h["_step"] for h in w["history"]}) == len(w["history"])  # no step twice
        assert w["summary"]["train_loss_last100"] == final["train_loss_last100"]

        r = mlruns[run.id]
        hist = client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in hist] == steps
        assert [m.value for m in hist] == [lines[s]["loss"] for s in steps]
        assert r.data.params == {k: str(v) for k, v in tracking.flatten(spec).items()}
        assert r.data.metrics["final.train_loss_last100"] == final["train_loss_last100"]
        assert r.info.status == "FINISHED"
