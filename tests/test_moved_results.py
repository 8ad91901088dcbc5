"""A results dir moved (mv r6 r7) while a run was interrupted: the work dir is keyed by the results
path, so its checkpoints are no longer found; `run` and `run --dry-run` both say, in one line, that
the run starts over and where its state is, instead of promising a resume."""

from __future__ import annotations

import json

from pcbench.grid import load_grid
from pcbench.run import launch
from test_launch import tiny_grid


def test_moved_results_dir_says_the_interrupted_run_starts_over(tmp_path, capsys):
    grid = load_grid(tiny_grid(tmp_path))
    base = next(r for r in grid.runs if r.stage == "base")
    old = launch.store_for(grid, str(tmp_path / "r6"), str(tmp_path / "work"))
    old.run_dir(base.id).mkdir(parents=True)
    (old.run_dir(base.id) / "status.json").write_text(json.dumps({"state": "interrupted", "lineage": "L1"}))
    old.paths(base.id).ckpt.mkdir(parents=True)  # its checkpoints, under r6's work key
    old.paths(base.id).owner.write_text(json.dumps({"lineage": "L1", "spec": "s", "data": "d"}))
    (tmp_path / "r6").rename(tmp_path / "r7")
    new = launch.store_for(grid, str(tmp_path / "r7"), str(tmp_path / "work"))
    assert new.work != old.work
    capsys.readouterr()
    reason = {d.run.id: d.reason for d in launch.plan_submission(grid, new, "base")}[base.id]
    assert reason == "interrupted: starts over (its work state is under another results path)"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"pcbench: warning: {base.id}: its work state is at ")
    assert str(old.paths(base.id).work) in err[0] and "starts over from step 0" in err[0]
    old.paths(base.id).owner.write_text(json.dumps({"lineage": "other", "spec": "s", "data": "d"}))
    assert launch.plan_submission(grid, launch.store_for(grid, str(tmp_path / "r7"), str(tmp_path / "work")),
                                  "base")[0].reason == "interrupted: resume"  # another lineage's state: not its
