"""Sweeps that extend themselves until the best value is bracketed (pcbench/sweep.py), the launcher's
rounds, and the report's flag on tuned values a sweep does not bracket."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from pcbench.run import launch, sweep
from pcbench.util.atomic import write_json
from pcbench.spec.config import SpecError
from pcbench.grid import load_grid
from pcbench.run.jobs import tuned_value
from pcbench.report.load import load_study
from pcbench.report.tuning import tuned_lines, tuning_table


def sweep_grid(tmp: Path, lrs, max_steps=3, steps=10, name="sw") -> Path:
    """base -> sweep (hpr, pc) x lr with `extend` -> compress tuned per method."""
    g = {
        "name": name,
        "defaults": {"data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32, "eval_batches": 2},
                     "train": {"batch_size": 8, "threads": 1, "log_every": 5, "ckpt_every": 50, "device": "cpu"},
                     "optim": {"lr": 0.01, "warmup": 2}},
        "stages": {
            "base": {"spec": {"model": {"name": "gpt2-nano"}, "train": {"steps": 30}}},
            "sweep": {"from": "base", "axes": {"method": ["hpr", "pc"], "lr": lrs},
                      "extend": {"axis": "lr", "max_steps": max_steps},
                      "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                               "compress": {"method": "${method}", "compression": 0.5},
                               "train": {"steps": steps}, "optim": {"lr": "${lr}"}}},
            "compress": {"from": "base", "axes": {"method": ["hpr", "pc"]},
                         "tune": {"stage": "sweep", "field": "optim.lr", "match": ["method"]},
                         "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                                  "compress": {"method": "${method}", "compression": 0.5},
                                  "train": {"steps": steps}}},
        },
    }
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(g, sort_keys=False))
    return p


OPTIMUM = {"hpr": 0.016, "pc": 0.002}  # fake: loss = (log2 lr - log2 optimum)^2


def fake_complete(store, run, optimum=OPTIMUM) -> None:
    """Record a finished run with a loss that is smallest at the method's optimum."""
    lr = float(run.labels.get("lr", optimum[run.labels["method"]]))
    loss = 3.0 + (math.log2(lr) - math.log2(optimum[run.labels["method"]])) ** 2
    store.run_dir(run.id).mkdir(parents=True, exist_ok=True)
    write_json(store.paths(run.id).final, {"train_loss_last100": loss, "kind": run.labels.get("method")})
    store.set_status(run.id, "completed")


def settle_fake(grid, store, optimum=OPTIMUM, rounds=10):
    """Play the launcher's rounds with fake runs: complete every submitted sweep/base run."""
    for _ in range(rounds):
        decisions = launch.plan_submission(grid, store)
        launch._prepare(store, grid)
        todo = [d.run for d in decisions if d.action == "submit" and d.run.stage != "compress"]
        if not todo:
            return decisions
        for r in todo:
            if r.stage == "sweep":
                fake_complete(store, r, optimum)
            else:  # the base: a completed run with an export on disk
                export = store.work / "export" / r.id
                export.mkdir(parents=True, exist_ok=True)
                (export / "config.json").write_text("{}")
                store.run_dir(r.id).mkdir(parents=True, exist_ok=True)
                write_json(store.paths(r.id).final, {"export_path": str(export)})
                store.set_status(r.id, "completed")
    raise AssertionError("sweep did not settle")


def test_unbracketed_sweep_is_extended_until_bracketed(tmp_path):
    grid = load_grid(sweep_grid(tmp_path, [0.001, 0.002, 0.004], max_steps=3))
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    first = launch.plan_submission(grid, store)
    held = {d.run.id: d.reason for d in first if d.run.stage == "compress"}
    assert len(held) == 2 and all(r.startswith(sweep.WAIT) for r in held.values())  # sweep not run yet
    decisions = settle_fake(grid, store)
    lines = {ln.labels["method"]: ln for ln in sweep.extend_grid(grid, store)}
    # hpr's optimum 0.016 lies beyond the upper edge: 0.008 and 0.016 added, then 0.032 brackets it
    assert lines["hpr"].values("lr") == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032]
    assert lines["hpr"].status == "bracketed" and lines["hpr"].best == 0.016
    # pc's optimum 0.002 was inside from the start: nothing added
    assert lines["pc"].added == [] and lines["pc"].status == "bracketed"
    # the tuned runs now depend on the extension runs and are submitted, not held
    comp = {r.labels["method"]: r for r in grid.runs if r.stage == "compress"}
    assert set(lines["hpr"].added) <= set(comp["hpr"].deps)
    assert not set(lines["hpr"].added) & set(comp["pc"].deps)
    assert {d.run.id: d.action for d in decisions if d.run.stage == "compress"} == \
        {comp["hpr"].id: "submit", comp["pc"].id: "submit"}
    for m, want in OPTIMUM.items():
        value, src = tuned_value(store.run(comp[m].id), store)
        assert value == want and store.run(src)["labels"]["lr"] == want
    # deterministic: a fresh grid object over the same records plans the same runs and ids
    again = load_grid(sweep_grid(tmp_path, [0.001, 0.002, 0.004], max_steps=3))
    sweep.extend_grid(again, store)
    assert [r.id for r in again.runs] == [r.id for r in grid.runs]


def test_lower_edge_extends_downwards(tmp_path):
    grid = load_grid(sweep_grid(tmp_path, [0.004, 0.008], max_steps=3))
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    settle_fake(grid, store)
    lines = {ln.labels["method"]: ln for ln in sweep.extend_grid(grid, store)}
    assert lines["pc"].values("lr") == [0.001, 0.002, 0.004, 0.008] and lines["pc"].status == "bracketed"
    assert lines["pc"].best == 0.002


def test_limit_is_flagged_and_does_not_block(tmp_path, capsys):
    grid = load_grid(sweep_grid(tmp_path, [0.00025, 0.0005], max_steps=2))
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    decisions = settle_fake(grid, store)
    lines = {ln.labels["method"]: ln for ln in sweep.extend_grid(grid, store)}
    assert lines["hpr"].status == "limit" and len(lines["hpr"].added) == 2  # 0.001, 0.002 < 0.016
    assert lines["hpr"].best == 0.002 and "upper edge" in lines["hpr"].note
    assert "not bracketed" in capsys.readouterr().err
    assert all(d.action == "submit" for d in decisions if d.run.stage == "compress")
    # the report flags the unbracketed value, from the store alone
    comp = {r.labels["method"]: r for r in grid.runs if r.stage == "compress"}
    for m, r in comp.items():
        value, src = tuned_value(store.run(r.id), store)
        fake_complete(store, r)
        write_json(store.paths(r.id).final, {**store.final(r.id),
                                             "tuned": {"field": "optim.lr", "value": value, "from_run": src}})
        store.set_status(r.id, "completed")  # as a job records it: the final record with `tuned`, then done
    study = load_study(tmp_path / "res", "sw")
    t = tuned_lines(study)  # both methods stopped at 0.002 (pc's optimum, hpr's limit): both at the edge
    assert len(t) == 2 and list(t["values"]) == ["0.00025 0.0005 0.001 0.002"] * 2 and not t.bracketed.any()
    assert "**NO: at the sweep's edge**" in tuning_table(study).markdown


def test_bad_extend_refused_with_one_line(tmp_path):
    p = sweep_grid(tmp_path, [0.001, 0.002])
    g = yaml.safe_load(p.read_text())
    g["stages"]["sweep"]["extend"] = {"axis": "method"}
    p.write_text(yaml.safe_dump(g))
    with pytest.raises(SpecError, match="positive numbers"):
        load_grid(p)
    g["stages"]["sweep"]["extend"] = {"axis": "lrr"}
    p.write_text(yaml.safe_dump(g))
    with pytest.raises(SpecError, match="not an axis"):
        load_grid(p)


@pytest.mark.slow
def test_local_launcher_extends_with_real_runs(tmp_path):
    """Tiny real runs: lrs far too small, so the best is the upper edge; one extension, then the limit;
    the tuned runs start only after the extension and use its value."""
    grid = load_grid(sweep_grid(tmp_path, [1e-5, 2e-5], max_steps=1, steps=6))
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    out = launch.submit(grid, store, "local", progress=False)
    assert not out.failed and out.waiting == 0
    ext = [r for r in grid.runs if getattr(r, "extension", False)]
    assert sorted((r.labels["method"], r.labels["lr"]) for r in ext) == [("hpr", 4e-5), ("pc", 4e-5)]
    order = out.submitted
    for r in grid.runs:
        if r.stage == "compress":
            tuned = store.final(r.id)["tuned"]
            assert tuned["value"] == 4e-5 and tuned["from_run"] in {e.id for e in ext}
            assert order.index(r.id) > max(order.index(e.id) for e in ext)
    assert not tuned_lines(load_study(tmp_path / "res", "sw")).bracketed.any()


def test_status_lists_the_extension_runs(tmp_path):
    from pcbench.run import views

    path = sweep_grid(tmp_path, [0.001, 0.002, 0.004], max_steps=3)
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    settle_fake(grid, store)
    added = [r for ln in sweep.extend_grid(load_grid(path), store) for r in ln.added]
    assert len(added) == 3  # hpr: 0.008, 0.016, 0.032
    text = views.status_table(load_grid(path), store)  # a fresh grid, as `pcbench status` loads it
    for rid in added:
        assert rid in text
    assert "completed: 10" in text  # base + 6 sweep runs + 3 extensions
