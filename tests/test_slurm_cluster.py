"""End-to-end checks of the local SLURM test cluster (scripts/slurm-cluster.sh) with submitit.

Skipped when the cluster is not up, failing instead when PCBENCH_REQUIRE_SLURM=1 (CI).
Submitted functions are stdlib functions (operator.add, os.getenv, time.sleep): functions
defined in this module would be pickled by reference to a module the job cannot import.
"""

from __future__ import annotations

import operator
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, List

import pytest
import submitit

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 45


@pytest.fixture
def cancel_at_end(slurm_cluster):
    """Collects job ids; whatever is still queued at teardown is cancelled."""
    ids: List[str] = []
    yield ids
    for job_id in ids:
        slurm_cluster.run("scancel", str(job_id), check=False)


def _executor(folder: Path, cluster, **params: Any) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        timeout_min=5, cpus_per_task=1, slurm_partition=cluster.partition, **params
    )
    return executor


def _result(job: submitit.Job, cluster, timeout: float = JOB_TIMEOUT_S) -> Any:
    """job.result(), but failing the test instead of blocking forever."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            info = cluster.run("sacct", "-j", str(job.job_id), "-o", "JobID,State,Reason%30",
                               check=False).stdout
            err = job.stderr() or ""
            pytest.fail(f"job {job.job_id} not done after {timeout}s; sacct:\n{info}\n"
                        f"stderr:\n{err[-2000:]}", pytrace=False)
        time.sleep(0.5)
    return job.result()


def _wait_sacct_states(cluster, job_id, expected: List[str], timeout: float = 20, **kw):
    """Waits until sacct lists exactly these states for job_id (accounting lags a bit)."""
    last: List[dict] = []

    def check():
        nonlocal last
        last = cluster.sacct(job_id, ("JobID", "State", "Start", "End"), **kw)
        return [r["State"] for r in last] == expected and all(r["End"] != "Unknown" for r in last)

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"sacct for job {job_id}: expected states {expected}, got {last}",
                        pytrace=False)
        time.sleep(0.5)
    return last


def _ts(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S")


def test_submitit_job_completes(slurm_cluster, tmp_path, cancel_at_end):
    executor = _executor(tmp_path, slurm_cluster)
    job = executor.submit(operator.add, 2, 3)
    env_job = executor.submit(os.getenv, "SLURM_JOB_ID")
    cancel_at_end += [job.job_id, env_job.job_id]

    assert _result(job, slurm_cluster) == 5
    # The function ran inside SLURM, as that very job.
    assert _result(env_job, slurm_cluster) == str(env_job.job_id)

    _wait_sacct_states(slurm_cluster, job.job_id, ["COMPLETED"])
    # submitit reads job states from sacct: COMPLETED, not UNKNOWN (which is what it gets
    # without slurmdbd).
    slurm_cluster.wait_until(lambda: job.get_info(mode="force").get("State") == "COMPLETED",
                             timeout=15, what=f"submitit to report job {job.job_id} COMPLETED")
    assert job.state == "COMPLETED"


def test_submitit_job_array(slurm_cluster, tmp_path, cancel_at_end):
    executor = _executor(tmp_path, slurm_cluster, slurm_array_parallelism=3)
    jobs = executor.map_array(operator.mul, [1, 2, 3], [10, 20, 30])
    assert len(jobs) == 3
    array_id = jobs[0].job_id.split("_")[0]
    cancel_at_end.append(array_id)
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]

    assert [_result(j, slurm_cluster) for j in jobs] == [10, 40, 90]

    records = _wait_sacct_states(slurm_cluster, array_id, ["COMPLETED"] * 3)
    assert sorted(r["JobID"] for r in records) == [f"{array_id}_{i}" for i in range(3)]


def test_dependency_afterok(slurm_cluster, tmp_path, cancel_at_end):
    executor = _executor(tmp_path, slurm_cluster)
    job_a = executor.submit(time.sleep, 4)
    cancel_at_end.append(job_a.job_id)
    executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{job_a.job_id}"})
    job_b = executor.submit(operator.add, 1, 1)
    cancel_at_end.append(job_b.job_id)

    # B waits for A (there are free CPUs, so only the dependency can hold it back).
    info_b = slurm_cluster.scontrol_job(job_b.job_id)
    assert info_b.get("JobState") == "PENDING", info_b
    assert info_b.get("Reason") == "Dependency", info_b
    assert f"afterok:{job_a.job_id}" in info_b.get("Dependency", ""), info_b

    assert _result(job_a, slurm_cluster) is None
    assert _result(job_b, slurm_cluster) == 2

    (rec_a,) = _wait_sacct_states(slurm_cluster, job_a.job_id, ["COMPLETED"])
    (rec_b,) = _wait_sacct_states(slurm_cluster, job_b.job_id, ["COMPLETED"])
    assert _ts(rec_b["Start"]) >= _ts(rec_a["End"]), (rec_a, rec_b)


def test_requeue_running_job(slurm_cluster, tmp_path, cancel_at_end):
    out = tmp_path / "requeue.out"
    proc = slurm_cluster.run(
        "sbatch", "--parsable", "--requeue", "--open-mode=append", "-J", "pcbench-requeue",
        "-p", slurm_cluster.partition, "-t", "5", "-o", str(out),
        "--wrap", 'echo "run ${SLURM_RESTART_COUNT:-0}"; sleep 5; echo "done ${SLURM_RESTART_COUNT:-0}"',
    )
    job_id = proc.stdout.strip().split(";")[0]
    cancel_at_end.append(job_id)
    wait = slurm_cluster.wait_until
    state = slurm_cluster.squeue_state

    wait(lambda: state(job_id) == "RUNNING", 20, f"job {job_id} to run")
    wait(lambda: out.is_file() and "run 0" in out.read_text(), 10, "the first run to start")
    slurm_cluster.run("scontrol", "requeue", job_id)

    # Back to the queue, then running again as its first restart, then done.
    wait(lambda: state(job_id) == "PENDING", 15, f"job {job_id} to be PENDING after requeue",
         interval=0.2)
    wait(lambda: state(job_id) == "RUNNING", 30, f"requeued job {job_id} to run again")
    assert slurm_cluster.scontrol_job(job_id).get("Restarts") == "1"
    wait(lambda: state(job_id) == "", 20, f"requeued job {job_id} to finish")

    records = _wait_sacct_states(slurm_cluster, job_id, ["REQUEUED", "COMPLETED"],
                                 duplicates=True)
    assert _ts(records[1]["Start"]) >= _ts(records[0]["End"]), records
    # Both runs wrote to the (appended) output; slurmstepd adds a "CANCELLED ... DUE TO JOB
    # REQUEUE" line in between.
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("slurmstepd")]
    assert lines == ["run 0", "run 1", "done 1"], out.read_text()
