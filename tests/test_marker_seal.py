"""A model's marker (`.pcbench.json`, its sha256 table) is sealed: a damaged marker is named as the
marker, never blamed on a file it lists; the card's rewrite (`record_rewrite`) keeps it sealed."""

from __future__ import annotations

import json

import pytest

from pcbench.util import outputs, verify


def _model(tmp_path):
    with outputs.staging(tmp_path / "m") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "README.md").write_text("card\n")
        (tmp / "model.safetensors").write_bytes(b"x" * 4096)
        outputs.install(tmp, tmp_path / "m", "model", "OUT")
    return tmp_path / "m"


def _flip(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_sha256_table_names_the_marker(tmp_path):
    m = _model(tmp_path)
    marker = m / outputs.MARKER
    digest = json.loads(marker.read_text())["sha256"]["config.json"]
    _flip(marker, marker.read_bytes().index(digest.encode()) + 5)  # still valid JSON, a hex digit changed
    with pytest.raises(verify.Damaged) as e:
        outputs.verify_output(m, "model")
    assert str(e.value) == f"model damaged: {marker} (sha256 mismatch)"


def test_a_marker_that_no_longer_parses_is_named_not_ignored(tmp_path):
    m = _model(tmp_path)
    marker = m / outputs.MARKER
    marker.write_bytes(marker.read_bytes()[:-20])  # truncated
    with pytest.raises(verify.Damaged) as e:
        outputs.verify_output(m, "model")
    assert str(e.value) == f"model damaged: {marker} (not valid JSON)"


def test_the_card_rewrite_keeps_the_marker_sealed(tmp_path):
    m = _model(tmp_path)
    new = b"card with scores\n"
    outputs.record_rewrite(m, "README.md", verify.sha256_bytes(new))
    (m / "README.md").write_bytes(new)
    assert outputs.verify_output(m, "model")["rewritten"]["README.md"] == verify.sha256_bytes(new)
