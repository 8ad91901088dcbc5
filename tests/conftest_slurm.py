"""Fixtures for tests that need the local SLURM test cluster (``scripts/slurm-cluster.sh``).

Imported by ``tests/conftest.py``. Use the ``slurm_cluster`` fixture in tests marked
``@pytest.mark.slurm``::

    @pytest.mark.slurm
    def test_something(slurm_cluster, tmp_path):
        slurm_cluster.run("sinfo")                 # CLI calls go to the test cluster
        ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")   # so does submitit

Where the cluster is found (first that exists):
  1. ``$PCBENCH_SLURM_DIR/env.sh`` (default ``/tmp/pcbench-slurm/env.sh``), written by
     ``bash scripts/slurm-cluster.sh start``;
  2. ``SLURM_CONF`` in the environment.
The cluster counts as up when ``sinfo`` shows its node usable and ``sacct`` answers. If it
is not up, the tests are skipped, or fail when ``PCBENCH_REQUIRE_SLURM=1`` (as in CI).
``slurm_cluster`` also sets ``SLURM_CONF`` (via monkeypatch, for the test only) so that
submitit, which calls sbatch/sacct/scancel with the process environment, uses the cluster.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import pytest

__all__ = ["SlurmCluster", "find_slurm_cluster", "slurm_cluster", "slurm_cluster_session"]

DEFAULT_SLURM_DIR = "/tmp/pcbench-slurm"
REQUIRE_ENV = "PCBENCH_REQUIRE_SLURM"
START_HINT = "start it with: bash scripts/slurm-cluster.sh start (after `... install`, as root)"
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


def _parse_env_sh(path: Path) -> Dict[str, str]:
    """``export A=1 B=2`` lines of an env.sh file -> {"A": "1", "B": "2"}."""
    env: Dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "export":
            continue
        for word in words[1:]:
            if "=" in word:
                key, value = word.split("=", 1)
                env[key] = value
    return env


@dataclass
class SlurmCluster:
    """The local test cluster: the environment to use it, and small helpers."""

    env: Dict[str, str]  # variables to set: SLURM_CONF (+ PCBENCH_SLURM_DIR)
    source: str  # where the env came from (for messages)
    partition: str = "debug"
    problem: Optional[str] = field(default=None)  # why it is not usable; None when up

    @property
    def conf(self) -> Path:
        return Path(self.env["SLURM_CONF"])

    def full_env(self) -> Dict[str, str]:
        return {**os.environ, **self.env}

    def run(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """Runs a SLURM command against the cluster; ``run("sacct", "-j", "3")``.
        A single string argument is split with shlex."""
        cmd: List[str] = shlex.split(args[0]) if len(args) == 1 else list(args)
        proc = subprocess.run(
            cmd, env=self.full_env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def sacct(self, job_id: Union[int, str], fields: Sequence[str] = ("JobID", "State"),
              *, duplicates: bool = False, allocations: bool = True) -> List[Dict[str, str]]:
        """Accounting records of a job (or array) as dicts, oldest first."""
        cmd = ["sacct", "-n", "-P", "-j", str(job_id), "-o", ",".join(fields)]
        if allocations:
            cmd.append("-X")
        if duplicates:
            cmd.append("--duplicates")
        out = self.run(*cmd).stdout
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]

    def squeue_state(self, job_id: Union[int, str]) -> str:
        """State in slurmctld (PENDING, RUNNING, ...), or "" once the job left the queue."""
        proc = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
        return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""

    def scontrol_job(self, job_id: Union[int, str]) -> Dict[str, str]:
        """``scontrol show job -o`` as a dict ({} once slurmctld forgot the job)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        return dict(w.split("=", 1) for w in shlex.split(proc.stdout) if "=" in w)

    @staticmethod
    def wait_until(predicate: Callable[[], object], timeout: float, what: str,
                   interval: float = 0.5) -> object:
        """Polls predicate until truthy; fails the test after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)
            time.sleep(interval)


def _check(cluster: SlurmCluster) -> Optional[str]:
    """None if the cluster answers and its node is usable, else the reason."""
    conf = cluster.env.get("SLURM_CONF")
    if not conf:
        return f"{cluster.source} sets no SLURM_CONF"
    if not Path(conf).is_file():
        return f"SLURM_CONF={conf} (from {cluster.source}) does not exist"
    for tool in ("sinfo", "sacct", "sbatch", "srun"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found on PATH"
    try:
        proc = cluster.run("sinfo", "-h", "-N", "-p", cluster.partition, "-o", "%T",
                           check=False, timeout=20)
        if proc.returncode != 0:
            return f"sinfo failed: {proc.stderr.strip()}"
        states = {s.rstrip("*~#!%$@^-") for s in proc.stdout.split()}
        if not states & USABLE_NODE_STATES:
            return f"no usable node in partition {cluster.partition!r} (sinfo: {sorted(states)})"
        proc = cluster.run("sacct", "-n", "-X", "-S", "now-1minutes", check=False, timeout=20)
        if proc.returncode != 0:
            return f"sacct failed (slurmdbd down?): {proc.stderr.strip()}"
    except subprocess.TimeoutExpired as exc:
        return f"{shlex.join(exc.cmd)} timed out"
    return None


def find_slurm_cluster() -> SlurmCluster:
    """Locates the test cluster and checks it; ``.problem`` says why it is unusable."""
    slurm_dir = Path(os.environ.get("PCBENCH_SLURM_DIR") or DEFAULT_SLURM_DIR)
    env_sh = slurm_dir / "env.sh"
    if env_sh.is_file():
        cluster = SlurmCluster(env=_parse_env_sh(env_sh), source=str(env_sh))
    elif os.environ.get("SLURM_CONF"):
        cluster = SlurmCluster(env={"SLURM_CONF": os.environ["SLURM_CONF"]},
                               source="$SLURM_CONF")
    else:
        return SlurmCluster(env={}, source="nothing",
                            problem=f"no {env_sh} and no SLURM_CONF in the environment")
    cluster.partition = os.environ.get("PCBENCH_SLURM_PARTITION", cluster.partition)
    cluster.problem = _check(cluster)
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster_session() -> SlurmCluster:
    """The cluster, checked once per session; skips (or fails if PCBENCH_REQUIRE_SLURM=1)."""
    cluster = find_slurm_cluster()
    if cluster.problem is not None:
        msg = f"local SLURM test cluster is not up: {cluster.problem}; {START_HINT}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {msg}", pytrace=False)
        pytest.skip(msg)
    return cluster


@pytest.fixture
def slurm_cluster(slurm_cluster_session: SlurmCluster,
                  monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The cluster, with its env (SLURM_CONF...) set in os.environ for this test (submitit)."""
    for key, value in slurm_cluster_session.env.items():
        monkeypatch.setenv(key, value)
    return slurm_cluster_session
