"""The launcher and the store: local runs, skip/resume/retry on re-run, parallel writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pcbench.train import checkpoint

from pcbench.run import launch
from pcbench.util.atomic import read_jsonl
from pcbench.grid import load_grid
from pcbench.store import Store

ROOT = Path(__file__).resolve().parents[1]


def tiny_grid(tmp: Path, name: str = "tiny", base_steps: int = 30, lrs=None, extra_stage=None) -> Path:
    """base (1 run) -> compress (hpr, pc) on a nano model; a few seconds per run."""
    g = {
        "name": name,
        "defaults": {"data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32, "eval_batches": 2},
                     "train": {"batch_size": 8, "threads": 1, "log_every": 5, "ckpt_every": 5, "device": "cpu"},
                     "optim": {"lr": 0.01, "warmup": 2}},
        "resources": {"partition": "debug", "timeout_min": 10, "cpus_per_task": 1},
        "stages": {
            "base": {"spec": {"model": {"name": "gpt2-nano"}, "train": {"steps": base_steps}}},
            "compress": {"from": "base", "axes": {"method": ["hpr", "pc"]},
                         "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                                  "compress": {"method": "${method}", "compression": 0.5},
                                  "train": {"steps": 10}, "optim": {"lr": 0.003}}},
        },
    }
    if extra_stage:
        g["stages"].update(extra_stage)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    return path


def finals(store: Store) -> dict:
    return {rid: store.final(rid) for rid in store.run_ids()}


def test_local_grid_runs_then_skips_everything(tmp_path):
    grid = load_grid(tiny_grid(tmp_path))
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    out = launch.submit(grid, store, "local", progress=False)
    assert len(out.submitted) == 3 and not out.failed
    assert all(store.state(r.id) == "completed" for r in grid.runs)
    f = finals(store)
    base = next(r for r in grid.runs if r.stage == "base")
    for r in grid.runs:
        if r.stage == "compress":
            assert f[r.id]["kind"] == r.labels["method"]
            assert f[r.id]["plan"]["params_before"] == f[base.id]["model"]["params"]["total"]
            assert Path(f[r.id]["export_path"]).is_dir()
    # Same tokens, same sequences, same widths for both methods.
    comp = [f[r.id] for r in grid.runs if r.stage == "compress"]
    assert comp[0]["plan"]["widths"] == comp[1]["plan"]["widths"] and comp[0]["tokens"] == comp[1]["tokens"]
    # A record written by an older pcbench (a field added since, at its default) is not rewritten.
    rec_path = store.run_dir(comp_id := next(r.id for r in grid.runs if r.stage == "compress")) / "run.json"
    old = json.loads(rec_path.read_text())
    del old["spec"]["compress"]["order"], old["seal"]  # an older pcbench sealed no records
    rec_path.write_text(json.dumps(old))
    st_path = rec_path.with_name("status.json")
    st = json.loads(st_path.read_text())
    del st["seal"], st["records"]
    st_path.write_text(json.dumps(st))
    before = rec_path.read_bytes()
    again = launch.submit(grid, store, "local", progress=False)
    assert again.submitted == [] and len(again.skipped) == 3
    assert rec_path.read_bytes() == before and store.state(comp_id) == "completed"
    events = read_jsonl(store.events)
    assert [e["state"] for e in events].count("completed") == 3


def test_cli_status_and_dry_run(tmp_path):
    path = tiny_grid(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PCBENCH_WORK": str(tmp_path / "work")}
    dry = subprocess.run([sys.executable, "-m", "pcbench.cli", "run", str(path), "--dry-run", "--results",
                          str(tmp_path / "res")], env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "3 runs" in dry.stdout and "to submit: 3 runs" in dry.stdout
    assert not (tmp_path / "res").exists()  # a dry run touches nothing
    st = subprocess.run([sys.executable, "-m", "pcbench.cli", "status", str(path), "--results",
                         str(tmp_path / "res")], env=env, capture_output=True, text=True)
    assert st.returncode == 0 and st.stdout.count("pending") >= 3


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_killed_grid_resumes_only_the_interrupted_run(tmp_path):
    # Reference: the same grid, uninterrupted.
    (tmp_path / "ref").mkdir()
    ref_grid = load_grid(tiny_grid(tmp_path / "ref", base_steps=200))
    ref_store = launch.store_for(ref_grid, tmp_path / "ref" / "results", tmp_path / "ref" / "work")
    launch.submit(ref_grid, ref_store, "local", progress=False)
    # Same grid in another store, killed while the base run trains.
    path = tiny_grid(tmp_path, base_steps=200)
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pcbench.cli", "run", str(path), "--results",
                             str(tmp_path / "results"), "--work", str(tmp_path / "work")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = next(r for r in grid.runs if r.stage == "base")
    ckpts = store.paths(base.id).ckpt
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.list_checkpoints(ckpts):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.state(base.id) == "running" and store.final(base.id) is None
    decisions = {d.run.id: d for d in launch.plan_submission(grid, store)}
    assert decisions[base.id].action == "submit" and "resume" in decisions[base.id].reason
    out = launch.submit(grid, store, "local", progress=False)
    assert not out.failed
    f = store.final(base.id)
    assert f["resumed_from"] > 0
    assert store.status(base.id)["attempts"] == 2
    ref = {r.id: ref_store.final(r.id) for r in ref_grid.runs}
    assert all(ref[rid]["train_loss_last100"] == store.final(rid)["train_loss_last100"] for rid in ref)


def test_failed_runs_block_dependents_and_rerun_only_when_asked(tmp_path):
    path = tiny_grid(tmp_path, name="bad")
    g = yaml.safe_load(path.read_text())
    g["stages"]["base"]["spec"]["optim"] = {"lr": 1e30, "warmup": 0, "grad_clip": 0.0}
    path.write_text(yaml.safe_dump(g))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    out = launch.submit(grid, store, "local", progress=False)
    base = next(r for r in grid.runs if r.stage == "base")
    assert out.failed == [base.id] and len(out.blocked) == 2
    st = store.status(base.id)
    assert st["state"] == "failed" and "non-finite" in st["error"]
    assert all(store.state(r.id) == "pending" for r in grid.runs if r.stage == "compress")
    again = launch.submit(grid, store, "local", progress=False)
    assert base.id not in again.submitted
    retry = launch.submit(grid, store, "local", retry_failed=True, progress=False)
    assert base.id in retry.submitted and store.status(base.id)["attempts"] == 2


def _writer(root: str, work: str, i: int, n: int) -> None:
    store = Store(root, work)
    for k in range(n):
        rid = f"r{i}-{k}"
        store.write_run({"id": rid, "stage": "s", "kind": "train", "labels": {"i": i, "k": k}, "spec": {},
                         "deps": [], "tune": None})
        store.set_status(rid, "running", pid=os.getpid())
        store.set_status(rid, "completed")


def test_eight_parallel_writers_lose_no_record(tmp_path):
    n = 25
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "res"), str(tmp_path / "w"), i, n)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    store = Store(tmp_path / "res", tmp_path / "w")
    assert len(store.run_ids()) == 8 * n
    assert all(store.state(r) == "completed" for r in store.run_ids())
    events = read_jsonl(store.events)
    assert len(events) == 8 * n * 2  # every append survived, none torn
    raw = store.events.read_text().splitlines()
    assert all(json.loads(line) for line in raw)


def test_bad_executor_and_missing_slurm_resources_refused_before_submitting(tmp_path):
    from pcbench.spec.config import SpecError

    path = tiny_grid(tmp_path)
    g = yaml.safe_load(path.read_text())
    del g["resources"]["partition"]
    path.write_text(yaml.safe_dump(g))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    with pytest.raises(SpecError, match="resources.partition"):
        launch.submit(grid, store, "slurm")
    with pytest.raises(SpecError, match="unknown executor"):
        launch.submit(grid, store, "kubernetes")
    assert not store.root.exists()  # nothing written


def test_completed_input_whose_export_is_gone_is_rerun(tmp_path):
    """Records come from git but the work directory is empty: a pending run that loads a completed
    run's export gets that run re-run first; with the export present it is skipped."""
    from pcbench.util.atomic import write_json

    grid = load_grid(tiny_grid(tmp_path))
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    base = next(r for r in grid.runs if r.stage == "base")
    store.write_run(base.record())
    store.set_status(base.id, "completed")
    export = tmp_path / "work" / "gone" / "model"
    write_json(store.paths(base.id).final, {"export_path": str(export)})

    plan = {d.run.id: d for d in launch.plan_submission(grid, store)}
    assert plan[base.id].action == "submit" and "exported model is gone" in plan[base.id].reason
    assert all(d.action == "submit" for d in plan.values())
    # Only the base is needed: selecting just the base itself does not rerun it.
    only_base = launch.plan_submission(grid, store, only="stage=base")
    assert [d.action for d in only_base] == ["skip"]

    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    plan = {d.run.id: d for d in launch.plan_submission(grid, store)}
    assert plan[base.id].action == "skip" and plan[base.id].reason == "completed"
