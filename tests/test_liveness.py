"""How `status` and `run --wait` read SLURM's answers (pcbench/liveness.py), on fake `sacct`,
`squeue` and `scancel` that print what a controller would: a job pending on a dependency that can
never be met is not alive (clusters without `kill_invalid_depend` keep it queued forever)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from pcbench.run import liveness
from pcbench.run.executors.base import Outcome
from pcbench.run.executors.slurm import wait_for_jobs
from pcbench.run.liveness import NEVER, Liveness, slurm_states
from pcbench.store import Store


def fake_slurm(tmp: Path, monkeypatch, sacct: str | None, squeue: str) -> Path:
    """Put fake SLURM commands first on PATH; `sacct=None`: accounting is down (exit 1). Returns the
    file `scancel` appends its arguments to."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    calls = tmp / "scancel.log"
    scripts = {"sacct": f"cat <<'X'\n{sacct}\nX" if sacct is not None else "exit 1",
               "squeue": f"cat <<'X'\n{squeue}\nX",
               "scancel": f'echo "$@" >> {calls}'}
    for name, body in scripts.items():
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


@pytest.mark.parametrize("accounting", [True, False])
def test_a_job_pending_on_a_dependency_that_can_never_be_met_is_never(tmp_path, monkeypatch, accounting):
    lines = "10|COMPLETED|None\n11|PENDING|DependencyNeverSatisfied\n12_[0-1%2]|PENDING|Dependency\n13|PENDING|Priority"
    fake_slurm(tmp_path, monkeypatch, lines if accounting else None, lines)
    got = slurm_states(["10", "11", "12_0", "12_1", "13", "14"])
    assert got == {"10": "COMPLETED", "11": NEVER, "12_0": "PENDING", "12_1": "PENDING", "13": "PENDING",
                   "14": liveness.GONE}


def _store(tmp: Path) -> Store:
    store = Store(tmp / "results" / "g")
    store.write_run({"id": "base", "deps": []})
    store.write_run({"id": "child", "deps": ["base"]})
    store.set_status("base", "failed", executor="slurm", job_id="10")
    store.set_status("child", "submitted", executor="slurm", job_id="11")
    return store


def test_status_calls_such_a_run_cancelled_and_names_the_reason(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch, "10|FAILED|None\n11|PENDING|DependencyNeverSatisfied", "")
    state, detail = Liveness(_store(tmp_path)).state("child")
    assert state == "cancelled" and "DependencyNeverSatisfied" in detail and "scancel 11" in detail


def test_wait_cancels_such_a_job_and_counts_its_run_blocked(tmp_path, monkeypatch):
    """`run --wait` used to wait for it forever."""
    calls = fake_slurm(tmp_path, monkeypatch, "10|FAILED|None\n11|PENDING|DependencyNeverSatisfied", "")
    store = _store(tmp_path)
    outcome = Outcome(submitted=["child"], jobs={"child": SimpleNamespace(job_id="11")})
    wait_for_jobs(outcome, store, poll_s=0.01)
    assert calls.read_text().split() == ["11"]
    assert outcome.blocked == ["child"] and outcome.submitted == []
    st = store.status("child")
    assert st["state"] == "cancelled" and "base" in st["error"]


def test_an_accounting_without_the_reason_field_still_answers(tmp_path, monkeypatch):
    """sacct that refuses `Reason` (exit 1) is asked again without it; the queue gives the reason."""
    fake_slurm(tmp_path, monkeypatch, None, "11|PENDING|DependencyNeverSatisfied")
    sacct = tmp_path / "bin" / "sacct"
    sacct.write_text('#!/bin/sh\ncase "$*" in *Reason*) exit 1;; esac\necho "10|COMPLETED"\n')
    assert slurm_states(["10", "11"]) == {"10": "COMPLETED", "11": NEVER}
