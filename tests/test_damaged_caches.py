"""Damage to what pcbench keeps in its cache and work dirs and reads back as data (cached facts,
the lm-eval task index, a run's kept indices, the verified-cache itself, extracted assets, the
directories it builds): named in one warning line, computed or built again, never read as data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pcbench.util import built, memo, verify


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PCBENCH_CACHE", str(tmp_path / "cache"))
    verify._memo.clear()
    verify._said.clear()
    memo._MEMORY.clear()


def damage(path: Path, how: str) -> None:
    """Same-size edits (a digit changed, bytes zeroed, a non-UTF-8 byte) or a truncation."""
    data = path.read_bytes()
    if how == "digit":
        i = next(i for i, c in enumerate(data) if chr(c).isdigit() and i > len(data) // 2)
        data = data[:i] + bytes([ord("0") + (data[i] - ord("0") + 1) % 10]) + data[i + 1:]
    elif how == "zeroed":
        data = data[:len(data) // 3] + b"\0" * 8 + data[len(data) // 3 + 8:]
    elif how == "latin1":
        data = data[:len(data) // 2] + b"\xe9" + data[len(data) // 2 + 1:]
    else:
        data = data[:len(data) // 2]
    path.write_bytes(data)


HOW = ["digit", "zeroed", "latin1", "truncated"]


@pytest.mark.parametrize("how", HOW)
def test_damaged_cached_facts_are_computed_again(tmp_path, capsys, how):
    calls = []

    def compute():
        calls.append(1)
        return {"params": 123456789, "widths": [[1024, 512], [4096, 2048]]}

    good = memo.remember("shape", {"model": "m"}, compute)
    entry, = (tmp_path / "cache" / "facts").iterdir()
    memo._MEMORY.clear()
    assert memo.remember("shape", {"model": "m"}, compute) == good and len(calls) == 1  # from disk
    damage(entry, how)
    memo._MEMORY.clear()
    assert memo.remember("shape", {"model": "m"}, compute) == good and len(calls) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cached facts damaged" in err and str(entry) in err
    memo._MEMORY.clear()
    assert memo.remember("shape", {"model": "m"}, compute) == good and len(calls) == 2  # rewritten whole


def test_unsealed_facts_of_an_older_pcbench_are_computed_again_quietly(tmp_path, capsys):
    memo.remember("shape", 1, lambda: 5)
    entry, = (tmp_path / "cache" / "facts").iterdir()
    rec = json.loads(entry.read_text())["value"]
    entry.write_text(json.dumps({"key": rec["key"], "value": 6}))  # the old layout, another value
    memo._MEMORY.clear()
    assert memo.remember("shape", 1, lambda: 5) == 5
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["digit", "zeroed", "truncated"])
def test_a_damaged_verified_cache_entry_never_condemns_a_good_file(tmp_path, how):
    f = tmp_path / "tokens.bin"
    f.write_bytes(os.urandom(4096))
    good = verify.sha256_file(f)
    entry, = (tmp_path / "cache" / "verified").iterdir()
    rec = json.loads(entry.read_text())
    assert rec["value"]["sha256"] == good
    if how == "digit":  # valid JSON, another digest: only the seal tells
        other = good.replace(next(c for c in good if c.isdigit()), "x", 1).replace("x", "f")
        rec["value"]["sha256"] = other
        entry.write_text(json.dumps(rec))
    else:
        damage(entry, how)
    verify._memo.clear()
    verify.verify_file(f, good)  # hashed again, not "damaged" on the entry's word
    assert verify._cached(f.resolve(), verify._version(f.stat())) == good  # and the entry rewritten


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_lm_eval_task_index_is_built_again(tmp_path, monkeypatch, capsys, how):
    import lm_eval.tasks

    from pcbench.run import preflight

    indexed = []

    class FakeManager:
        def __init__(self, **kw):
            indexed.append(1)
            self.all_tasks = ["arc_easy", "hellaswag", "piqa"] + [f"task_{i}" for i in range(40)]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeManager)
    names = preflight.lm_eval_task_names()
    assert preflight.lm_eval_task_names() == names and len(indexed) == 1
    entry, = (tmp_path / "cache").glob("lm_eval_task_names-*.json")
    damage(entry, how)
    assert preflight.lm_eval_task_names() == names and len(indexed) == 2
    assert "lm-eval task index damaged" in capsys.readouterr().err


def test_a_damaged_kept_index_plan_is_computed_again(tmp_path, capsys):
    import torch

    from pcbench.compress.plan import Plan
    from pcbench.train.loop import _saved_plan

    plan = Plan(compression=0.5, widths={"mlp": 6}, keep={"mlp": torch.tensor([0, 2, 3, 5, 7, 11])},
                params_before=100, params_after=50)
    path = tmp_path / "plan.json"
    verify.write_sealed_json(path, plan.to_dict())
    assert _saved_plan(path).to_dict() == plan.to_dict()
    assert _saved_plan(tmp_path / "none.json") is None
    for how in HOW:
        verify.write_sealed_json(path, plan.to_dict())
        damage(path, how)
        assert _saved_plan(path) is None, how
    assert "kept-index plan damaged" in capsys.readouterr().err
    path.write_text(json.dumps(plan.to_dict()))  # an older pcbench's, unsealed: read as it is
    assert _saved_plan(path).to_dict() == plan.to_dict()


def _build(tmp: Path) -> None:
    (tmp / "sub").mkdir()
    (tmp / "a.txt").write_bytes(b"alpha" * 100)
    (tmp / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)


@pytest.mark.parametrize("how", ["zeroed", "truncated", "file-gone", "table-damaged", "table-gone"])
def test_a_damaged_built_directory_is_named_and_built_again(tmp_path, capsys, how):
    builds = []

    def build(tmp):
        builds.append(1)
        _build(tmp)

    out = tmp_path / "cache" / "thing"
    kw = dict(what="converted model", lock=tmp_path / "cache" / ".thing.lock", legacy="a.txt")
    assert built.ensure(out, build, **kw) == out and len(builds) == 1
    assert built.ensure(out, build, **kw) == out and len(builds) == 1  # checked, not rebuilt
    target = {"zeroed": "sub/b.bin", "truncated": "a.txt", "file-gone": "sub/b.bin",
              "table-damaged": built.SUMS, "table-gone": built.SUMS}[how]
    if how in ("file-gone", "table-gone"):
        (out / target).unlink()
    else:
        damage(out / target, "truncated" if how != "zeroed" else how)
    verify._memo.clear()
    built.ensure(out, build, **kw)
    err = capsys.readouterr().err
    assert len(builds) == 2 and "converted model damaged" in err and "rebuilding it" in err  # table-gone too
    assert (out / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".thing.") and p.name != ".thing.lock"]


def _fake_asset(tmp_path, monkeypatch) -> Path:
    """An asset `fake` from a local archive ($PCBENCH_ASSETS), fetched: its extracted directory."""
    import hashlib
    import io
    import tarfile

    from pcbench.data import assets

    override = tmp_path / "override"
    override.mkdir()
    monkeypatch.setenv("PCBENCH_ASSETS", str(override))
    with tarfile.open(override / "fake-1.0.tgz", "w:gz") as tf:
        for name, data in {"package/a.txt": b"alpha" * 50, "package/tokenizer.json": b'{"v": 1234}'}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    sha = hashlib.sha256((override / "fake-1.0.tgz").read_bytes()).hexdigest()
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("npm", "fake@1.0", "fake-1.0.tgz", sha))
    return assets.fetch("fake")


def test_a_damaged_extracted_asset_is_extracted_again(tmp_path, monkeypatch, capsys):
    from pcbench.data import assets

    out = _fake_asset(tmp_path, monkeypatch)
    damage(out / "package" / "tokenizer.json", "digit")
    verify._memo.clear()
    assert assets.fetch("fake") == out
    assert (out / "package" / "tokenizer.json").read_bytes() == b'{"v": 1234}'
    assert "asset 'fake' damaged" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["unparseable", "parseable"])
def test_a_tokenizer_that_lost_its_table_is_rebuilt_not_blessed(tmp_path, capsys, how):
    """A cache entry without sha256.json used to get a fresh table of whatever it held: a damaged
    tokenizer.json was then trusted for good (every command failing with a JSON parse error, or a
    parseable one tokenising silently otherwise)."""
    from pcbench.data import assets, tokenizer

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "assets").symlink_to(assets.cache_dir() / "assets", target_is_directory=True)
    good = tokenizer.load_tokenizer("bpe-512")
    out = tokenizer.bpe_dir(512, "books")
    path = out / "tokenizer.json"
    want = path.read_bytes()
    if how == "unparseable":
        damage(path, "truncated")
    else:  # a merge dropped: still a tokenizer, another one
        data = json.loads(want)
        data["model"]["merges"] = data["model"]["merges"][:-1]
        path.write_text(json.dumps(data))
    (out / built.SUMS).unlink()
    verify._memo.clear()
    tok = tokenizer.load_tokenizer("bpe-512")
    assert path.read_bytes() == want and tokenizer.fingerprint(tok) == tokenizer.fingerprint(good)
    err = capsys.readouterr().err
    assert err == f"pcbench: warning: tokenizer damaged: {out / built.SUMS} (missing: its files cannot be checked); " \
                  "rebuilding it\n", err


def test_an_extracted_asset_that_lost_its_table_is_extracted_again(tmp_path, monkeypatch, capsys):
    from pcbench.data import assets

    out = _fake_asset(tmp_path, monkeypatch)
    damage(out / "package" / "tokenizer.json", "digit")
    (out / built.SUMS).unlink()
    verify._memo.clear()
    assert assets.fetch("fake") == out and (out / "package" / "tokenizer.json").read_bytes() == b'{"v": 1234}'
    assert "asset 'fake' damaged" in capsys.readouterr().err


def test_a_tokenizer_file_that_does_not_parse_is_named_in_one_line(tmp_path):
    """Checked bytes that are no tokenizer (what was fetched or packaged was bad): `Damaged`, with the
    path, which the command shows as one line (was: the tokenizers library's bare parse error)."""
    from pcbench.cli import _one_line
    from pcbench.data import tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ')
    with pytest.raises(verify.Damaged) as e:
        tokenizer._parsed(path, lambda: tokenizer.PreTrainedTokenizerFast(tokenizer_file=str(path)))
    assert _one_line(e.value).startswith(f"tokenizer damaged: {path} (does not parse: "), str(e.value)


def test_the_verified_cache_forgets_files_that_are_gone(tmp_path, monkeypatch):
    files = [tmp_path / f"f{i}.bin" for i in range(12)]
    for f in files:
        f.write_bytes(f.name.encode())
        verify.sha256_file(f)
    root = tmp_path / "cache" / "verified"
    assert len(list(root.iterdir())) == 12
    for f in files[:8]:
        f.unlink()
    (root / "junk.json").write_text("{")
    monkeypatch.setattr(verify, "PRUNE_AT", 10)
    monkeypatch.setattr(verify, "_pruned", False)
    new = tmp_path / "new.bin"
    new.write_bytes(b"new")
    verify.sha256_file(new)  # the first entry this process writes past PRUNE_AT prunes
    left = sorted(verify.read_sealed_json(e)["path"] for e in root.iterdir())
    assert left == sorted(str(f) for f in [*files[8:], new])
    verify._memo.clear()
    assert verify.sha256_file(files[9]) == verify.sha256_bytes(b"f9.bin")
