"""Files pcbench writes get the usual modes (0666/0777 & ~umask), not tempfile's private 0600/0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pcbench.util.atomic import write_bytes, write_json, write_text


@pytest.fixture()
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_atomic_writes_follow_the_umask(tmp_path: Path, umask):
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "sub" / "b.json", {"a": 1})
    write_bytes(tmp_path / "c.bin", b"\0")
    assert {k: oct(v) for k, v in _modes(tmp_path).items() if k != "."} == {
        "a.txt": "0o644", "sub": "0o755", "sub/b.json": "0o644", "c.bin": "0o644"}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.json", "c.bin", "sub"]  # no temp left
    umask(0o077)
    write_text(tmp_path / "private.txt", "y")
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_report_figure_is_0644(tmp_path: Path, umask):
    import matplotlib.pyplot as plt

    from pcbench.report.figures import save

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    save(fig, tmp_path / "f.png")
    assert stat.S_IMODE((tmp_path / "f.png").stat().st_mode) == 0o644


def test_bench_figure_is_0644(tmp_path: Path, umask):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcbench.bench import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    save_figure(fig, tmp_path / "b.png")
    plt.close(fig)
    assert stat.S_IMODE((tmp_path / "b.png").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["b.png"]


def test_exported_model_files_are_0644_and_dirs_0755(tmp_path: Path, umask):
    from pcbench.spec.config import ModelSpec
    from pcbench.models import build_config, build_model
    from pcbench.data.tokenizer import load_tokenizer
    from pcbench.train.loop import export_model

    tok = load_tokenizer("bpe-512")
    model = build_model(build_config(ModelSpec(name="gpt2-tiny"), 512, 32, tok.bos_token_id, tok.eos_token_id), seed=0)
    out = tmp_path / "model"
    export_model(model, tok, out)
    modes = _modes(out)
    assert "model.safetensors" in modes and "config.json" in modes
    bad = {k: oct(v) for k, v in modes.items() if v != (0o755 if (out / k).is_dir() else 0o644)}
    assert not bad, bad
