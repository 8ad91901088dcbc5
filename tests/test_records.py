"""Run records read back verified: sealed run.json/status.json, the sha256 of every record a run
wrote kept when it completed; a record that is not what was written is `damaged` (named with its
path) in `health`, `status`, the report, and never read as data. Records of an older pcbench (no
seal) stay readable. Store-level, no training: each test takes well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcbench.report import build_report
from pcbench.store import Store
from pcbench.util.atomic import append_jsonl, write_json

FINAL = {"kind": "hpr", "steps": 10, "tokens": 1000, "train_loss_last100": 3.25, "heldout_loss": 3.5,
         "model": {"params": {"total": 500}, "d_model": 8, "d_ff": 32}, "base": {"params": {"total": 1000}}}


def completed(store: Store, rid: str, loss: float = 3.25) -> Path:
    """A train run recorded as pcbench records one: run.json, running, metrics, final.json, completed."""
    store.write_run({"id": rid, "stage": "compress", "kind": "train", "labels": {"seed": 0},
                     "spec": {"train": {"steps": 10}}, "deps": []})
    store.set_status(rid, "running")
    for s in (5, 10):
        append_jsonl(store.paths(rid).metrics, {"step": s, "loss": loss + 1 / s})
    write_json(store.paths(rid).final, {**FINAL, "train_loss_last100": loss})
    store.set_status(rid, "completed")
    return store.run_dir(rid)


def _replaced(old: str, new: str):
    def edit(text: str) -> str:
        assert old in text
        return text.replace(old, new, 1)
    return edit


# Each kind of damage: the record it edits, and how (its text in, its text out).
EDITS = {
    "final-digit": ("final.json", _replaced("3.25", "3.15")),
    "metrics-empty": ("metrics.jsonl", lambda text: ""),
    "status-digit": ("status.json", lambda text: json.dumps({**json.loads(text), "attempts": 7})),
    "status-state": ("status.json", _replaced('"completed"', '"compketed"')),
    "run-label": ("run.json", _replaced('"seed": 0', '"seed": 1')),
    "run-empty": ("run.json", lambda text: ""),
}


def _damage(d: Path, case: str) -> Path:
    name, edit = EDITS[case]
    (d / name).write_text(edit((d / name).read_text()))
    return d / name


CASES = list(EDITS)


@pytest.mark.parametrize("case", CASES)
def test_a_record_changed_after_it_was_written_is_damaged_never_data(tmp_path, case):
    store = Store(tmp_path / "g")
    completed(store, "ok")
    d = completed(store, "r", loss=3.25)
    assert store.health("r") == ("completed", None)
    bad = _damage(d, case)
    state, problem = store.health("r")
    assert state == "damaged" and problem.startswith(f"{bad}:"), (state, problem)
    assert store.health("r", "train")[0] == "damaged"  # as the launcher and `status` ask
    recs = {r["id"]: r for r in store.records()}
    assert set(recs) == {"ok", "r"}  # never left out
    assert recs["r"]["status"]["state"] == "damaged" and recs["r"]["final"] is None
    assert str(bad) in recs["r"]["status"]["problem"]
    if case in ("final-digit", "metrics-empty"):
        assert store.final("r") is None if case == "final-digit" else store.metrics("r") == []
    assert recs["ok"]["status"]["state"] == "completed" and recs["ok"]["final"]["train_loss_last100"] == 3.25


@pytest.mark.parametrize("case", CASES)
def test_the_report_lists_a_damaged_run_with_its_path(tmp_path, case):
    store = Store(tmp_path / "results" / "g")
    completed(store, "ok")
    bad = _damage(completed(store, "r"), case)
    out = build_report(tmp_path / "results", "g", tmp_path / "out")
    md = (out / "REPORT.md").read_text()
    rel = bad.relative_to(store.root)  # named from the store's root: no machine's path in a report
    assert "## Damaged runs" in md and str(rel) in md and str(tmp_path) not in md, md
    runs = (out / "tables" / "runs.csv").read_text()
    row = next(line for line in runs.splitlines() if line.startswith("r,"))
    assert ",damaged," in row and str(bad) in row
    assert not any("3.15" in p.read_text() for p in (out / "tables").iterdir())  # the edited number: not data


def test_unsealed_records_of_an_older_pcbench_stay_readable(tmp_path):
    d = tmp_path / "g" / "runs" / "r"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"id": "r", "stage": "s", "kind": "train", "labels": {}, "spec": {}}))
    (d / "status.json").write_text(json.dumps({"state": "completed"}))
    (d / "final.json").write_text(json.dumps(FINAL))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 3.3}) + "\n")
    store = Store(tmp_path / "g")
    assert store.health("r") == ("completed", None)
    assert store.final("r") == FINAL and store.records()[0]["final"] == FINAL
    (d / "metrics.jsonl").write_text("")  # but a completed run of 10 steps has metrics
    assert store.health("r")[0] == "damaged"


def test_a_rerun_seals_its_new_records(tmp_path):
    store = Store(tmp_path / "g")
    completed(store, "r", loss=3.25)
    completed(store, "r", loss=3.5)  # trained again: new records, new digests
    assert store.health("r") == ("completed", None) and store.final("r")["train_loss_last100"] == 3.5
    assert "seal" not in store.status("r") and "seal" not in store.run("r")


def test_report_counts_only_the_runs_the_grid_has_now(tmp_path, capsys):
    """A grid edited in place (lr 0.003 -> 0.004: new run ids) and run again into the same store:
    the old runs stay in the store, but the report counts only those of the store's grid.json and
    lists the others as an earlier version's."""
    store = Store(tmp_path / "results" / "g")
    for rid, loss in (("old-s0", 3.0), ("old-s1", 3.1)):
        completed(store, rid, loss)
    completed(store, "new-s0", 3.5)
    store.write_grid_runs(["new-s0"])  # what `pcbench run` records of the edited grid
    say: list[str] = []
    out = build_report(tmp_path / "results", "g", tmp_path / "out", progress=say.append)
    assert any(s.startswith("1 runs read (2 of an earlier version of the grid, not counted)") for s in say), say
    md = (out / "REPORT.md").read_text()
    assert "## Runs of an earlier version of the grid, not counted" in md and "old-s1" in md
    runs = (out / "tables" / "runs.csv").read_text()
    assert "new-s0" in runs and "old-s0" not in runs and "old-s1" not in runs
    (store.root / "grid.json").write_text("{}")  # damaged (not sealed): named, every run counted
    build_report(tmp_path / "results", "g", tmp_path / "out", progress=say.append)
    assert "grid.json" in capsys.readouterr().err
    assert [s for s in say if "runs read" in s][-1].startswith("3 runs read")


def test_run_records_the_grids_current_run_ids(tmp_path):
    from pcbench.grid import load_grid
    from pcbench.run import launch
    from test_launch import tiny_grid

    grid = load_grid(tiny_grid(tmp_path))
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    launch._prepare(store, grid)
    assert store.grid_runs() == {r.id for r in grid.runs}
