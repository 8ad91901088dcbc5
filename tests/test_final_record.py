"""A run's final record (`final.json`) is valid JSON: a value there is none (`steps: 0` has no
training loss, `data.eval_batches: 0` no held-out loss) is null, never NaN, which JSON cannot hold
and which `pcbench report` and `status` read as missing."""

from __future__ import annotations

import json
import math

import yaml

from test_cli_errors import cli

SPEC = {"model": {"name": "gpt2-nano"},
        "data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32, "eval_batches": 0},
        "train": {"steps": 0, "batch_size": 8, "threads": 1, "device": "cpu", "ckpt_every": 0},
        "optim": {"lr": 0.01}}


def _strict(text: str):
    """JSON as the standard has it (Python's json reads NaN and Infinity; other readers refuse them)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_a_run_without_a_loss_records_null_not_nan(tmp_path):
    """Before: `steps: 0` wrote "train_loss_last100": NaN (and eval_batches: 0 "heldout_loss": NaN)
    into final.json, exit 0."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    rc, out, err = cli("train", spec, "--out", tmp_path / "o")
    assert rc == 0, err
    final = _strict((tmp_path / "o" / "record" / "final.json").read_text())
    assert final["train_loss_last100"] is None and final["final_train_loss"] is None
    assert final["heldout_loss"] is None and final["steps"] == 0
    assert json.loads(out.strip().splitlines()[-1])["train_loss_last100"] is None


def test_a_non_finite_value_in_a_record_is_null_and_named(capsys):
    from pcbench.train.loop import _finite_record

    rec = _finite_record({"a": 1.0, "b": math.nan, "c": {"d": [math.inf, 2]}, "e": None})
    assert rec == {"a": 1.0, "b": None, "c": {"d": [None, 2]}, "e": None}
    err = capsys.readouterr().err
    assert "b is nan" in err and "c.d[0] is inf" in err
