"""A checkpoint named as input (`compress --base`, a spec's `model.path`, a grid's `model.path` under
`run --dry-run`) that transformers could not load is refused before any work, as bad input: one
line naming the file at fault, exit 2, nothing created. The checks read JSON and safetensors
headers only (`preflight.check_model_dir`), so a foreign checkpoint (no pcbench marker to verify
against) is judged as a pcbench one is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from test_cli_errors import base_model, cli, compress_args, write_grid  # noqa: F401
from test_user_faults import one_error_line


def _foreign(tmp: Path, base: Path, damage: str) -> tuple[Path, str]:
    """A copy of `base` without pcbench's marker, damaged as `damage` says; (dir, file named)."""
    d = tmp / f"base-{damage}"
    shutil.copytree(base, d)
    (d / ".pcbench.json").unlink()
    name, text = {
        "config-list": ("config.json", "[]"),
        "config-unknown-type": ("config.json", '{"model_type": "nope"}'),
        "config-no-type": ("config.json", '{"hidden_size": 8}'),
        "no-weights": ("model.safetensors", None),
        "index-shard-missing": ("model.safetensors.index.json",
                                '{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}'),
        "tokenizer-missing": ("tokenizer.json", None),
        "tokenizer-not-a-tokenizer": ("tokenizer.json", '{"version": "1.0"}'),
        "tokenizer-truncated": ("tokenizer.json", (base / "tokenizer.json").read_text()[:300]),
    }[damage]
    if damage == "index-shard-missing":
        (d / "model.safetensors").unlink()
        (d / name).write_text(text)
        return d, str(d / "model-00001-of-00002.safetensors")
    if text is None:
        (d / name).unlink()
        return d, str(d) if name.endswith(".safetensors") else str(d / name)
    (d / name).write_text(text)
    return d, str(d / name)


DAMAGES = ["config-list", "config-unknown-type", "config-no-type", "no-weights", "index-shard-missing",
           "tokenizer-missing", "tokenizer-not-a-tokenizer", "tokenizer-truncated"]


@pytest.mark.parametrize("cmd", ["compress", "train", "dry-run"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_checkpoint_transformers_cannot_load_is_refused_before_any_work(tmp_path, base_model, damage, cmd):
    """Before: compress and train said 'unexpected ValueError: Unrecognized model ... (a bug)', 'Couldn't
    instantiate the backend tokenizer', "KeyError: 'added_tokens'" or 'no file named model.safetensors'
    (rc 1); `run --dry-run` said 'checks before the first job: ok' for missing weights or a tokenizer.json
    that does not parse, and crashed on a config.json of no known model."""
    base, named = _foreign(tmp_path, base_model, damage)
    out = tmp_path / "out"
    if cmd == "compress":
        rc, _, err = cli(*compress_args(base, out))
    elif cmd == "train":
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"model": {"name": "hf", "path": str(base)},
                                        "data": {"tokenizer": "model", "seq_len": 32},
                                        "train": {"steps": 2, "batch_size": 8, "threads": 1, "device": "cpu"}}))
        rc, _, err = cli("train", spec, "--out", out)
    else:
        def edit(g):
            g["stages"] = {"ft": {"spec": {"model": {"name": "hf", "path": str(base)}, "data": {"tokenizer": "model"},
                                           "train": {"steps": 2}}}}
        rc, _, err = cli("run", write_grid(tmp_path, edit), "--dry-run", "--results", out)
    assert rc == 2, err
    one_error_line(err, named)
    assert not out.exists() and not out.with_name("out.pcbench").exists()


@pytest.mark.parametrize("damage", ["no-weights", "tokenizer-truncated", "config-unknown-type"])
def test_a_dry_run_checks_the_checkpoint_whatever_tokenizer_the_run_uses(tmp_path, base_model, damage):
    """A run that tokenizes with its own tokenizer still loads the checkpoint: its weights must be there,
    its config must be a model's, and every JSON file of it must parse (README: whether each local
    checkpoint is whole)."""
    base, named = _foreign(tmp_path, base_model, damage)

    def edit(g):
        g["stages"] = {"ft": {"spec": {"model": {"name": "hf", "path": str(base)}, "train": {"steps": 2}}}}
    rc, _, err = cli("run", write_grid(tmp_path, edit), "--dry-run", "--results", tmp_path / "r")
    assert rc == 2, err
    one_error_line(err, named)


def test_a_whole_foreign_checkpoint_passes(tmp_path, base_model):
    """The same checkpoint without damage (and without pcbench's marker) is fine to start from."""
    base = tmp_path / "base"
    shutil.copytree(base_model, base)
    (base / ".pcbench.json").unlink()

    def edit(g):
        g["stages"] = {"ft": {"spec": {"model": {"name": "hf", "path": str(base)}, "data": {"tokenizer": "model"},
                                       "train": {"steps": 2}}}}
    rc, out, err = cli("run", write_grid(tmp_path, edit), "--dry-run", "--results", tmp_path / "r")
    assert rc == 0, err
    assert "checks before the first job: ok" in out
