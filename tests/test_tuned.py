"""The tuned value is patched into the typed spec (`grid.fieldpath`, `jobs.resolved_train_spec`), and
a tuned run's final.json is written once, by the training loop, with its `tuned` provenance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from pcbench.util import atomic

from pcbench.run import launch
from pcbench.spec.config import OptimSpec, RunSpec, SpecError
from pcbench.grid import load_grid
from pcbench.grid.fieldpath import field_value, with_field
from pcbench.run.jobs import RunJob, resolved_train_spec
from test_sweep import OPTIMUM, fake_complete, settle_fake, sweep_grid


def test_with_field_replaces_along_the_path_typed():
    spec = RunSpec()
    new = with_field(spec, "optim.lr", "2e-3", "run x")  # converted as the YAML loader converts
    assert new.optim.lr == 0.002 and isinstance(new.optim, OptimSpec)
    assert spec.optim.lr == 1e-3 and spec.optim is not new.optim  # the original is untouched
    assert new.data is spec.data and field_value(new, "optim.lr") == 0.002
    assert with_field(spec, "optim", {"lr": 0.5}).optim == OptimSpec(lr=0.5)
    assert with_field(spec, "optim", OptimSpec(lr=0.25)).optim.lr == 0.25
    with pytest.raises(SpecError, match=r"run x.optim.lr: must be a number, got 'fast'"):
        with_field(spec, "optim.lr", "fast", "run x")
    with pytest.raises(SpecError, match=r"unknown 'lrr' \(did you mean 'lr'\?\)"):
        with_field(spec, "optim.lrr", 0.1)
    with pytest.raises(SpecError, match="it is unset"):
        field_value(spec, "compress.distill")  # no compress block on a pretraining spec


def test_bad_tune_field_is_refused_when_the_grid_loads(tmp_path):
    p = sweep_grid(tmp_path, [0.001, 0.002])
    g = yaml.safe_load(p.read_text())
    g["stages"]["compress"]["tune"]["field"] = "optim.lrr"
    p.write_text(yaml.safe_dump(g))
    with pytest.raises(SpecError, match=r"stages.compress.tune.field: 'optim.lrr' names no field.*did you mean 'lr'"):
        load_grid(p)


def test_resolved_train_spec_is_typed_with_the_tuned_value(tmp_path):
    grid = load_grid(sweep_grid(tmp_path, [0.001, 0.002, 0.004], max_steps=3))
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    settle_fake(grid, store)
    for r in (r for r in grid.runs if r.stage == "compress"):
        record = store.run(r.id)
        before = json.dumps(record, sort_keys=True)
        spec, tuned = resolved_train_spec(record, store)
        assert type(spec) is RunSpec and type(spec.optim) is OptimSpec
        want = OPTIMUM[r.labels["method"]]
        assert spec.optim.lr == want and tuned["value"] == want and tuned["field"] == "optim.lr"
        assert store.run(tuned["from_run"])["labels"]["lr"] == want
        base = r.deps[0]
        assert spec.model.path == store.final(base)["export_path"]  # run:<id> resolved
        assert dataclasses.replace(spec, optim=r.spec.optim, model=r.spec.model) == r.spec  # nothing else moved
        assert json.dumps(record, sort_keys=True) == before  # the record read is not patched


def test_tuned_final_json_is_written_once(tmp_path, monkeypatch):
    """A real tuned run (tiny): its final.json is written exactly once, with `tuned` in it."""
    g = {"name": "once",
         "defaults": {"data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32, "eval_batches": 1},
                      "train": {"batch_size": 4, "threads": 1, "log_every": 1, "ckpt_every": 0, "device": "cpu"},
                      "optim": {"lr": 0.01, "warmup": 1}},
         "stages": {
             "base": {"spec": {"model": {"name": "gpt2-nano"}, "train": {"steps": 2}}},
             "sweep": {"from": "base", "axes": {"method": ["hpr"], "lr": [0.002, 0.016]},
                       "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                                "compress": {"method": "${method}"}, "train": {"steps": 1}, "optim": {"lr": "${lr}"}}},
             "compress": {"from": "base", "axes": {"method": ["hpr"]},
                          "tune": {"stage": "sweep", "field": "optim.lr", "match": ["method"]},
                          "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                                   "compress": {"method": "${method}"}, "train": {"steps": 2}}}}}
    path = tmp_path / "once.yaml"
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    launch._prepare(store, grid)
    base, comp = (next(r for r in grid.runs if r.stage == s) for s in ("base", "compress"))
    RunJob(store.root, store.work, base.id, progress=False)()
    for r in (r for r in grid.runs if r.stage == "sweep"):
        fake_complete(store, r)  # hpr's fake optimum: 0.016

    writes: list[Path] = []
    real = atomic.write_text

    def spy(p, text, *a, **k):
        writes.append(Path(p))
        return real(p, text, *a, **k)

    monkeypatch.setattr(atomic, "write_text", spy)  # every write_json goes through it
    RunJob(store.root, store.work, comp.id, progress=False)()
    final = store.paths(comp.id).final
    assert writes.count(final) == 1
    rec = store.final(comp.id)
    sweep_best = next(r.id for r in grid.runs if r.stage == "sweep" and r.labels["lr"] == 0.016)
    assert rec["tuned"] == {"field": "optim.lr", "value": 0.016, "from_run": sweep_best}
    assert store.state(comp.id) == "completed"
