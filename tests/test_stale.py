"""A completed run whose inputs changed is run again (`pcbench.run.stale`): a tuned run whose sweep
gained a better value, and the runs that load its model; never a run whose inputs are the same."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from pcbench.grid import load_grid
from pcbench.report.load import load_study
from pcbench.run import launch, stale, sweep
from pcbench.run.jobs import done
from pcbench.util.atomic import write_json
from test_sweep import OPTIMUM, fake_complete, settle_fake, sweep_grid


def with_finetune(path):
    """The sweep grid plus a stage that loads each tuned run's model (`run:<id>`)."""
    g = yaml.safe_load(path.read_text())
    g["stages"]["ft"] = {"from": "compress", "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                                                      "train": {"steps": 10}}}
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    return path


def complete_as_a_job(store, run, digest: str) -> None:
    """Record a compress/ft run as its job does: `tuned`, `inputs`, an export digest, then completed."""
    record = store.run(run.id)
    fake_complete(store, run) if "method" in run.labels else None
    final = dict(store.final(run.id) or {"train_loss_last100": 3.0})
    value, src = stale.tuned_value(record, store)
    if src is not None:
        final["tuned"] = {"field": "optim.lr", "value": value, "from_run": src}
    inputs = stale.input_digests(record, store)
    if inputs:
        final["inputs"] = inputs
    final["export_sha256"] = digest
    write_json(store.paths(run.id).final, final)
    store.set_status(run.id, "completed")


def decisions_by_id(grid, store):
    """The launcher's plan, then its records of the grid's runs (as a round writes them)."""
    plan = launch.plan_submission(grid, store)
    launch._prepare(store, grid)
    launch._renew_records(store, plan)
    return {d.run.id: d for d in plan}


@pytest.mark.parametrize("new_best", [True, False], ids=["sweep-gains-a-better-value", "same-best"])
def test_tuned_run_is_rerun_when_its_sweep_gains_a_better_value(tmp_path, monkeypatch, new_best):
    monkeypatch.setattr(stale.Store, "export_problem", lambda self, rid, final=None: None)  # fake exports
    path = with_finetune(sweep_grid(tmp_path, [0.001, 0.002, 0.004]))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    settle_fake(grid, store)
    comp = {r.labels["method"]: r for r in grid.runs if r.stage == "compress"}
    ft = {r.deps[0]: r for r in grid.runs if r.stage == "ft"}
    for m, r in comp.items():
        complete_as_a_job(store, r, f"{m}-v1")
        complete_as_a_job(store, ft[r.id], f"ft-{m}-v1")
    assert {d.action for d in decisions_by_id(grid, store).values()} == {"skip"}  # all current

    # The user adds lr 0.003 to the sweep: the new sweep runs run first; the tuned runs wait for them.
    g = yaml.safe_load(path.read_text())
    g["stages"]["sweep"]["axes"]["lr"] = [0.001, 0.002, 0.003, 0.004]
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    grid = load_grid(path)
    plan = decisions_by_id(grid, store)
    new = [r for r in grid.runs if r.stage == "sweep" and r.labels["lr"] == 0.003]
    assert [plan[r.id].action for r in new] == ["submit", "submit"]
    for r in comp.values():
        assert plan[r.id].action == "skip" and plan[r.id].reason.startswith(sweep.WAIT), plan[r.id].reason
        assert all(rid in plan[r.id].reason for rid in [n.id for n in new if n.labels["method"] ==
                                                         r.labels["method"]])
    assert plan[ft[comp["pc"].id].id].action == "skip"

    # 0.003 turns out best for pc (when new_best: below the 0.002 run's 3.0), never for hpr
    for r in new:
        fake_complete(store, r)
        if new_best and r.labels["method"] == "pc":
            write_json(store.paths(r.id).final, {**store.final(r.id), "train_loss_last100": 2.9})
            store.set_status(r.id, "completed")
    plan = decisions_by_id(grid, store)
    pc, hpr = comp["pc"].id, comp["hpr"].id
    assert plan[hpr].action == "skip" and plan[hpr].reason == "completed"
    assert plan[ft[hpr].id].action == "skip"
    assert done(store, hpr) and done(store, ft[hpr].id)
    if not new_best:
        assert plan[pc].action == "skip" and plan[ft[pc].id].action == "skip"
        assert done(store, pc) and done(store, ft[pc].id)
        return
    assert plan[pc].action == "submit"
    assert "optim.lr = 0.002" in plan[pc].reason and "now 0.003" in plan[pc].reason
    assert plan[ft[pc].id].action == "submit" and pc in plan[ft[pc].id].reason
    # the job decides again: the tuned run is not done; its dependent not until the tuned run's
    # export changes (a retrain to the same weights leaves it current)
    assert not done(store, pc) and done(store, ft[pc].id)
    complete_as_a_job(store, comp["pc"], "pc-v1")  # retrained: 0.003 now, same export digest
    assert store.final(pc)["tuned"]["value"] == 0.003 and done(store, pc) and done(store, ft[pc].id)
    complete_as_a_job(store, comp["pc"], "pc-v2")  # other weights: the dependent is stale
    assert not done(store, ft[pc].id)
    assert "was trained again since" in stale.rerun_reason(store, store.run(ft[pc].id))
    complete_as_a_job(store, ft[pc], "ft-pc-v2")
    assert all(done(store, r.id) for r in grid.runs)
    assert {d.action for d in decisions_by_id(grid, store).values()} == {"skip"}


def test_eval_records_and_checks_the_model_it_scored(tmp_path, monkeypatch):
    """An eval run's record keeps its model run's export digest: scored again once that changes."""
    from pcbench.store import Store

    store = Store(tmp_path / "res", tmp_path / "work")
    store.write_run({"id": "t", "kind": "train", "stage": "s", "deps": [], "spec": {}})
    store.write_run({"id": "e", "kind": "eval", "stage": "ev", "deps": ["t"], "spec": {"model": "run:t"}})
    monkeypatch.setattr(Store, "export_problem", lambda self, rid, final=None: None)
    for rid, rec, name in (("t", {"export_sha256": "a"}, "final.json"),
                           ("e", {"average": 0.5, "inputs": {"t": "a"}}, "eval.json")):
        store.run_dir(rid).mkdir(parents=True, exist_ok=True)
        write_json(store.run_dir(rid) / name, rec)
        store.set_status(rid, "completed")
    assert stale.input_digests(store.run("e"), store) == {"t": "a"}
    assert done(store, "e")
    write_json(store.paths("t").final, {"export_sha256": "b"})
    assert not done(store, "e") and "run t" in stale.rerun_reason(store, store.run("e"))


@pytest.mark.slow
def test_real_grid_edited_sweep_retrains_the_tuned_run_as_a_fresh_grid_would(tmp_path):
    """Tiny real runs: a tuned run completed, then the sweep edited to try a larger value; the plain
    rerun trains the tuned run again with the new best, and its losses equal those of a fresh run of
    the edited grid; the report names the value it ran with."""
    def grid_file(lrs, where):
        where.mkdir(exist_ok=True)
        p = sweep_grid(where, lrs, max_steps=0, steps=6)
        g = yaml.safe_load(p.read_text())
        g["stages"]["sweep"]["axes"]["method"] = g["stages"]["compress"]["axes"]["method"] = ["pc"]
        del g["stages"]["sweep"]["extend"]
        p.write_text(yaml.safe_dump(g, sort_keys=False))
        return p

    def run(p, res):
        grid = load_grid(p)
        store = launch.store_for(grid, res, tmp_path / "work")
        out = launch.submit(grid, store, "local", progress=False)
        assert not out.failed
        return grid, store, out

    first = grid_file([1e-5, 2e-5], tmp_path / "a")
    grid, store, _ = run(first, tmp_path / "res")
    tuned_id = next(r.id for r in grid.runs if r.stage == "compress")
    assert store.final(tuned_id)["tuned"]["value"] == 2e-5
    edited = grid_file([1e-5, 2e-5, 3e-3], tmp_path / "a")  # far larger: better after 6 steps
    grid, store, out = run(edited, tmp_path / "res")
    sweep_runs = [r for r in grid.runs if r.stage == "sweep"]
    losses = {r.labels["lr"]: store.final(r.id)["train_loss_last100"] for r in sweep_runs}
    best = min(losses, key=losses.get)
    assert best == 3e-3, losses
    assert tuned_id in out.submitted and store.final(tuned_id)["tuned"]["value"] == best
    _, fresh_store, _ = run(grid_file([1e-5, 2e-5, 3e-3], tmp_path / "b"), tmp_path / "fresh")
    got = [r["loss"] for r in store.metrics(tuned_id)]
    want = [r["loss"] for r in fresh_store.metrics(tuned_id)]
    assert got == want and len(got) > 1 and all(math.isfinite(x) for x in got)
    aside = list((store.paths(tuned_id).work / ".stale").rglob("final.json"))
    assert aside and json.loads(aside[0].read_text())["tuned"]["value"] == 2e-5  # kept, not deleted
    study = load_study(tmp_path / "res", grid.name)
    assert study.runs.loc[study.runs.id == tuned_id, "lr_used"].item() == best
