"""The sha256 helper (`pcbench.util.verify`) and what stands on it, without training: a digest is
reused only for the same version of a file, a damaged token store is rebuilt, an output's recorded
files are checked, a checkpoint of another owner is never resumed, and work state of other records
is moved aside (`store.claim_work`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pcbench.data.tokens import TokenStore
from pcbench.store import RunPaths, claim_work
from pcbench.train import checkpoint
from pcbench.util import outputs, verify


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PCBENCH_CACHE", str(tmp_path / "cache"))
    verify._memo.clear()


def test_digest_is_reused_only_for_the_same_version_of_a_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 10000)
    good = verify.sha256_file(p)
    verify._memo.clear()
    assert verify.sha256_file(p) == good  # from the verified-cache on disk
    entries = list((tmp_path / "cache" / "verified").iterdir())
    assert len(entries) == 1 and json.loads(entries[0].read_text())["value"]["sha256"] == good
    st = p.stat()
    with open(p, "r+b") as f:  # the same size, the same mtime put back: only the bytes differ
        f.seek(5000)
        f.write(b"\0" * 16)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(verify.Damaged, match=r"damaged: .*f\.bin \(sha256 mismatch\)"):
        verify.verify_file(p, good, what="test file")
    with pytest.raises(verify.Damaged, match="missing"):
        verify.verify_file(tmp_path / "gone", good)


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "meta-unreadable"])
def test_token_store_is_checked_on_open(tmp_path, damage):
    store = TokenStore.create(tmp_path / "s", np.arange(1000) % 50)
    assert store.meta["tokens_sha256"] == verify.sha256_file(store.path / "tokens.bin")
    del store
    path = tmp_path / "s" / ("meta.json" if damage == "meta-unreadable" else "tokens.bin")
    if damage == "zeroed":
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"\0" * 8)
    elif damage == "truncated":
        os.truncate(path, 1000)
    else:
        path.write_text('{"format": ')
    with pytest.raises(verify.Damaged) as e:
        TokenStore(tmp_path / "s")
    assert str(e.value).startswith("token store damaged: ") and str(path) in str(e.value)


def test_model_output_records_and_checks_its_files(tmp_path):
    with outputs.staging(tmp_path / "m") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x" * 4096)
        outputs.install(tmp, tmp_path / "m", "model", "OUT", lineage="abc")
    marker = outputs.verify_output(tmp_path / "m")
    assert set(marker["sha256"]) == {"config.json", "model.safetensors"} and marker["lineage"] == "abc"
    digest = outputs.output_digest(marker)
    os.truncate(tmp_path / "m" / "model.safetensors", 100)
    with pytest.raises(verify.Damaged, match=r"model damaged: .*model\.safetensors"):
        outputs.verify_output(tmp_path / "m", "model")
    assert outputs.output_digest(outputs.read_marker(tmp_path / "m")) == digest  # the record is unchanged


def test_checkpoint_of_another_owner_is_put_aside(tmp_path, capsys):
    root = tmp_path / "ckpt"
    checkpoint.save(root, 5, {"w": torch.zeros(2)}, owner="mine")
    checkpoint.save(root, 10, {"w": torch.ones(2)}, owner="theirs")
    path, problems = checkpoint.newest_valid(root, owner="mine")
    assert path.name == "step_00000005" and "belongs to other records" in problems[0]
    assert (root / "step_00000010.stale").is_dir()  # kept, never resumed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pcbench: warning: ")


def test_claim_work_moves_state_of_other_records_aside(tmp_path):
    paths = RunPaths(record=tmp_path / "rec", work=tmp_path / "work")
    paths.ckpt.mkdir(parents=True)
    (paths.ckpt / "step_00000005").mkdir()
    paths.plan.write_text("{}")
    said: list[str] = []
    mine = {"lineage": "a", "spec": "s", "data": "d"}
    assert claim_work(paths, mine, adopt=True, say=said.append) is None  # an older pcbench's state: adopted
    assert json.loads(paths.owner.read_text()) == mine and paths.plan.exists()
    assert claim_work(paths, mine, say=said.append) is None and not said  # its own: kept
    moved = claim_work(paths, {**mine, "lineage": "b"}, say=said.append)
    assert moved is not None and (moved / "ckpt" / "step_00000005").is_dir() and (moved / "plan.json").exists()
    assert not paths.ckpt.exists() and not paths.plan.exists()
    assert len(said) == 1 and "lineage differs" in said[0] and str(moved) in said[0]
    assert json.loads(paths.owner.read_text())["lineage"] == "b"
