"""The launcher's data prefetch (pcbench/prefetch.py): what a grid's runs need, what the cache lacks."""

from __future__ import annotations

import json

from pcbench.grid import load_grid
from pcbench.run.prefetch import missing, needs

from test_launch import ROOT


def test_needs_are_each_store_and_the_suite_once_in_first_use_order():
    grid = load_grid(ROOT / "experiments" / "default.yaml")
    assert needs(grid.runs) == [
        {"corpus": "books", "tokenizer": "bpe-512", "split": "train", "max_tokens": None, "tokenizer_corpus": "books"},
        {"corpus": "sotu", "tokenizer": "bpe-512", "split": "test", "max_tokens": None, "tokenizer_corpus": "books"},
        {"tasks": True},
    ]
    assert needs([r for r in grid.runs if r.kind == "train"])[-1] != {"tasks": True}


def test_missing_reads_the_stores_own_records(tmp_path, monkeypatch):
    from pcbench.data import corpora

    monkeypatch.setenv("PCBENCH_CACHE", str(tmp_path))
    items = needs(load_grid(ROOT / "experiments" / "default.yaml").runs)
    assert missing(items) == items  # an empty cache lacks everything
    store = tmp_path / "tokens" / "books-train-bpe-512-0123456789abcdef"
    store.mkdir(parents=True)
    meta = {**items[0], "inputs_sha256": corpora.fingerprint("books", "train")}
    (store / "meta.json").write_text(json.dumps(meta))
    assert missing(items) == items[1:]
    (store / "meta.json").write_text(json.dumps({**meta, "inputs_sha256": "0" * 64}))  # other inputs
    assert missing(items) == items


def test_needs_are_what_training_prepares(tmp_path, monkeypatch):
    """The prefetch list and the training loop read one list (`DataSpec.token_stores`): the stores a
    real run prepares are exactly those `needs` names for it, with and without a held-out set."""
    from types import SimpleNamespace

    from pcbench.data import tokens as data
    from test_train import paths, spec_of

    from pcbench.train.loop import train

    real, calls = data.prepare_tokens, []

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(data, "prepare_tokens", spy)
    for i, eval_batches in enumerate((2, 0)):
        calls.clear()
        spec = spec_of(data={"eval_batches": eval_batches}, train={"steps": 2})
        train(spec, paths(tmp_path, f"r{i}"))
        assert calls == needs([SimpleNamespace(kind="train", spec=spec)])
        assert len(calls) == (2 if eval_batches else 1)
