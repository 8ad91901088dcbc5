"""Grids through the real local SLURM cluster: arrays with afterok dependencies, and requeue."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from pcbench.train import checkpoint

from pcbench.run import launch
from pcbench.grid import load_grid
from test_launch import tiny_grid

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def job_env(slurm_cluster, monkeypatch):
    """Jobs inherit the submitter's environment: make the package importable there."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("PCBENCH_PROGRESS", "0")
    return slurm_cluster


def wait_done(store, run_ids, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {r: store.state(r) for r in run_ids}
        if all(s in ("completed", "failed") for s in states.values()):
            return states
        time.sleep(1)
    pytest.fail(f"runs not finished after {timeout}s: {states}")


def comparable(final: dict) -> dict:
    keep = ("kind", "steps", "tokens", "train_loss_last100", "final_train_loss", "heldout_loss",
            "flops_per_token", "fixed_flops_per_step", "plan", "model")
    return {k: final.get(k) for k in keep}


def test_slurm_grid_matches_local(job_env, tmp_path):
    path = tiny_grid(tmp_path)
    grid = load_grid(path)
    local = launch.store_for(grid, tmp_path / "local" / "results", tmp_path / "local" / "work")
    launch.submit(grid, local, "local", progress=False)
    slurm = launch.store_for(grid, tmp_path / "slurm" / "results", tmp_path / "slurm" / "work")
    out = launch.submit(grid, slurm, "slurm", log_dir=tmp_path / "logs")
    assert len(out.submitted) == 3
    # Compress runs were submitted with an afterok dependency on the base job.
    base = next(r for r in grid.runs if r.stage == "base")
    base_job = slurm.status(base.id)["job_id"]
    for r in grid.runs:
        if r.stage == "compress":
            job = slurm.status(r.id)["job_id"]
            info = job_env.run("scontrol", "show", "job", str(job), check=False).stdout
            assert f"afterok:{base_job}" in info or slurm.state(r.id) in ("running", "completed"), info
    states = wait_done(slurm, [r.id for r in grid.runs])
    assert set(states.values()) == {"completed"}, {r: slurm.status(r) for r in states}
    for r in grid.runs:
        assert comparable(slurm.final(r.id)) == comparable(local.final(r.id)), r.id
        assert slurm.status(r.id)["executor"] == "slurm"
    # Submitting the finished grid again submits nothing.
    again = launch.submit(grid, slurm, "slurm", log_dir=tmp_path / "logs")
    assert again.submitted == [] and len(again.skipped) == 3


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_requeued_job_resumes_from_its_checkpoint(job_env, tmp_path):
    path = tiny_grid(tmp_path, name="requeue", base_steps=1000)
    g = yaml.safe_load(path.read_text())
    g["stages"] = {"base": g["stages"]["base"]}
    g["defaults"]["train"].update(ckpt_every=50, batch_size=32)  # ~10 s of training
    path.write_text(yaml.safe_dump(g))
    grid = load_grid(path)
    (run,) = grid.runs
    ref = launch.store_for(grid, tmp_path / "ref" / "results", tmp_path / "ref" / "work")
    launch.submit(grid, ref, "local", progress=False)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    launch.submit(grid, store, "slurm", log_dir=tmp_path / "logs")
    job_id = store.status(run.id)["job_id"]
    ckpts = store.paths(run.id).ckpt
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.list_checkpoints(ckpts):
        time.sleep(0.05)
    assert checkpoint.list_checkpoints(ckpts), "no checkpoint before the requeue"
    assert store.final(run.id) is None, "the run finished before it could be requeued"
    job_env.run("scontrol", "requeue", str(job_id))
    wait_done(store, [run.id])
    final = store.final(run.id)
    assert store.state(run.id) == "completed"
    assert final["resumed_from"] > 0
    assert store.status(run.id)["attempts"] >= 2
    assert final["train_loss_last100"] == ref.final(run.id)["train_loss_last100"]
    acct = job_env.run("sacct", "-j", str(job_id), "--duplicates", "-X", "-n", "-o", "State", check=False).stdout
    assert "REQUEUED" in acct or "PREEMPTED" in acct, acct
