"""Exit codes and liveness through the real local SLURM cluster: `run --wait` counts job failures and
the dependents SLURM cancelled; `status` never says running/submitted for a job that is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pcbench.run import launch
from pcbench.grid import load_grid
from test_launch import tiny_grid
from test_slurm_grid import job_env  # noqa: F401 - fixture

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PCBENCH_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "pcbench.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_wait_counts_a_failed_job_and_its_cancelled_dependents(job_env, tmp_path):  # noqa: F811
    path = tiny_grid(tmp_path, name="slurmfail")
    g = yaml.safe_load(path.read_text())
    g["stages"]["base"]["spec"]["optim"] = {"lr": 1e30, "warmup": 0, "grad_clip": 0.0}  # non-finite: fails
    path.write_text(yaml.safe_dump(g))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    where = ["--results", str(tmp_path / "results"), "--work", str(tmp_path / "work")]
    r = cli("run", str(path), "--executor", "slurm", "--wait", *where)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "3 run(s) submitted" not in r.stdout or "1 failed, 2 blocked" in r.stdout
    assert "1 failed, 2 blocked" in r.stdout, r.stdout
    base = next(x for x in grid.runs if x.stage == "base")
    assert store.state(base.id) == "failed"
    for x in grid.runs:
        if x.stage == "compress":
            st = store.status(x.id)
            assert st["state"] == "cancelled" and base.id in st["error"], st
    st = cli("status", str(path), *where)
    assert "submitted" not in st.stdout and st.stdout.count("cancelled") >= 2, st.stdout


def test_status_checks_slurm_before_saying_running(job_env, tmp_path):  # noqa: F811
    path = tiny_grid(tmp_path, name="slurmgone", base_steps=3000)
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    where = ["--results", str(tmp_path / "results"), "--work", str(tmp_path / "work")]
    r = cli("run", str(path), "--executor", "slurm", *where)
    assert r.returncode == 0, r.stderr[-3000:]
    base = next(x for x in grid.runs if x.stage == "base")
    job = store.status(base.id)["job_id"]
    deadline = time.time() + 300
    while time.time() < deadline and store.state(base.id) != "running":
        time.sleep(0.5)
    assert store.state(base.id) == "running"
    job_env.run("scancel", str(job))
    # SLURM cancels the dependents (afterok can no longer be met) at its next scheduling pass: wait
    # until no job of the grid is left in the queue, since until then "submitted" is the truth
    jobs = [str(job)] + [str(store.status(x.id).get("job_id")).split("_")[0] for x in grid.runs  # an array
                         if x.stage != "base" and store.status(x.id).get("job_id")]  # pending unsplit: by its id
    deadline = time.time() + 120
    while time.time() < deadline and any(job_env.squeue_state(j) for j in jobs):
        time.sleep(0.5)
    st = cli("status", str(path), *where)
    assert st.returncode == 0 and "Traceback" not in st.stderr
    rows = {ln.split()[0]: ln for ln in st.stdout.splitlines() if ln.split() and ln.split()[0] in
            {x.id for x in grid.runs}}
    assert all(" running" not in ln and " submitted" not in ln for ln in rows.values()), st.stdout
    assert any(s in rows[base.id] for s in ("interrupted", "cancelled", "lost")), st.stdout
    # a rerun plans to resume them all
    plan = {d.run.id: d for d in launch.plan_submission(grid, store)}
    assert all(d.action == "submit" for d in plan.values()), {k: d.reason for k, d in plan.items()}
