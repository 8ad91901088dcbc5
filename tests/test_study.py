"""The notebook API (issue 24): `pcbench.load_study` is the report's study of a grid, without torch;
and `pcbench status --watch`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_load_study_is_the_reports_study_of_the_committed_mini_store(monkeypatch):
    """Every table the report builds from `pcbench.load_study` equals the committed report's CSV."""
    import pcbench
    from pcbench.report import contents, csv_text

    monkeypatch.chdir(ROOT)
    study = pcbench.load_study("experiments/mini.yaml")  # its results_dir, else results/
    same = pcbench.load_study("mini", results=ROOT / "results")
    assert study.runs.equals(same.runs) and study.train.equals(same.train) and study.evals.equals(same.evals)
    assert len(study.runs) == len(list((ROOT / "results" / "mini" / "runs").iterdir()))
    inp = contents.Inputs(study)
    compared = 0
    for part in contents.PARTS:
        if "csv" not in part.formats:
            continue
        for t in part.tables(inp):
            committed = ROOT / "paper_figures" / "mini" / "tables" / f"{t.name}.csv"
            assert csv_text(t.data) == committed.read_text(), t.name
            compared += 1
    assert compared >= 10
    pc = study.train[study.train.method == "pc"].id.tolist()[:2]
    curves = study.curves(pc)
    assert set(curves.run) == set(pc) and {"step", "tokens", "loss"} <= set(curves.columns)
    assert set(study.recovery(pc).run) == set(pc)


def test_load_study_imports_no_torch_and_refuses_a_missing_store_in_one_line(tmp_path):
    code = ("import sys, json, pcbench; s = pcbench.load_study('experiments/mini.yaml'); "
            "print(json.dumps([len(s.runs), len(s.train), len(s.evals), "
            "[m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    runs, train, evals, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [] and runs == 122 and train > 0 and evals > 0
    import pcbench
    from pcbench.spec.config import SpecError

    with pytest.raises(SpecError, match=r"load_study: no results for grid 'mini' under .*nowhere/"):
        pcbench.load_study("mini", results=tmp_path / "nowhere")


def test_readme_shows_load_study():
    text = (ROOT / "README.md").read_text()
    assert "pcbench.load_study(" in text


def test_status_watch_stops_when_the_grid_is_done_or_idle_and_on_ctrl_c(tmp_path):
    from test_cli_errors import cli
    from test_launch import tiny_grid

    rc, out, err = cli("status", ROOT / "experiments" / "mini.yaml", "--results", ROOT / "results", "--watch",
                       "--interval", "0.01")
    assert rc == 0 and out.count("completed: 122") == 1 and "grid mini done" in out, err
    grid = tiny_grid(tmp_path)  # never run: pending, nothing in flight
    args = ("status", grid, "--results", tmp_path / "results", "--work", tmp_path / "work", "--watch")
    rc, out, err = cli(*args, "--interval", "0.01")
    assert rc == 0 and out.count("pending: 3") == 3 and "no run of grid tiny in flight: 3 pending" in out, err
    with mock.patch("time.sleep", side_effect=KeyboardInterrupt):
        rc, out, err = cli(*args, "--interval", "5")
    assert rc == 0 and out.count("pending: 3") == 1 and "Traceback" not in err and "error" not in err
    rc, out, err = cli(*args, "--interval", "0")
    assert rc == 2 and "--interval" in err and "must be > 0" in err
