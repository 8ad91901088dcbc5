"""The launcher's data prefetch (pcbench/prefetch.py): what a grid's runs need, what the cache lacks."""

from __future__ import annotations

import json

from pcbench.grid import load_grid
from pcbench.run.prefetch import missing, needs

from test_launch import ROOT


def test_needs_are_the_suite_once_the_stores_are_the_prepare_stages():
    grid = load_grid(ROOT / "experiments" / "default.yaml")
    assert needs(grid.runs) == [{"tasks": True}]  # token stores: `run.prepare`, before any job
    assert needs([r for r in grid.runs if r.kind == "train"]) == []


def test_missing_reads_the_stores_own_records(tmp_path, monkeypatch):
    from pcbench.data import corpora

    monkeypatch.setenv("PCBENCH_CACHE", str(tmp_path))
    items = [{"corpus": "books", "tokenizer": "bpe-512", "split": "train", "max_tokens": None,
              "tokenizer_corpus": "books"}, {"tasks": True}]
    assert missing(items) == items  # an empty cache lacks everything
    store = tmp_path / "tokens" / "books-train-bpe-512-0123456789abcdef"
    store.mkdir(parents=True)
    meta = {**items[0], "inputs_sha256": corpora.fingerprint("books", "train")}
    (store / "meta.json").write_text(json.dumps(meta))
    assert missing(items) == items[1:]
    (store / "meta.json").write_text(json.dumps({**meta, "inputs_sha256": "0" * 64}))  # other inputs
    assert missing(items) == items


def test_training_opens_the_stores_the_prepare_stage_builds(tmp_path, monkeypatch):
    """The prepare stage and the training loop read one list (`spec.stores.run_stores`): the stores
    a real run opens are exactly those `run.prepare.grid_stores` names for it."""
    from types import SimpleNamespace

    from pcbench.data import shards
    from pcbench.run.prepare import grid_stores
    from test_train import paths, spec_of

    from pcbench.train.loop import train

    real, calls = shards.open_store, []

    def spy(ref, **kw):
        calls.append(ref)
        return real(ref, **kw)

    monkeypatch.setattr(shards, "open_store", spy)
    for i, eval_batches in enumerate((2, 0)):
        calls.clear()
        spec = spec_of(data={"eval_batches": eval_batches}, train={"steps": 2})
        train(spec, paths(tmp_path, f"r{i}"))
        run = SimpleNamespace(kind="train", spec=spec, id="r")
        grid = SimpleNamespace(by_id=lambda: {"r": run})
        assert calls == [n.ref for n in grid_stores(grid, [run])]
        assert len(calls) == (2 if eval_batches else 1)
