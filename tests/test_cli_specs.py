"""`compress` and `eval` build their specs through the one loader (`config.load_spec`): a flag left
out keeps the spec's default (defined once, in the dataclasses), a refused value names its flag."""

from __future__ import annotations

import dataclasses

import pytest

from pcbench.cli import _spec_from_flags, build_parser
from pcbench.spec.config import EvalSpec, RunSpec, SpecError, field_default, load_spec

BASE = {"model.name": "smollm2-135m"}  # a preset with weights: no checkpoint needed to validate


def _compress(*flags: str):
    args = build_parser().parse_args(["compress", "--base", "smollm2-135m", "--method", "pc", "--compression",
                                      "0.4", "--steps", "3", "--out", "o", *flags])
    return args, _spec_from_flags(RunSpec, args, "compress", {**BASE, "compress.method": args.method})


def test_flags_left_out_keep_the_spec_defaults():
    _, got = _compress()
    want = load_spec(RunSpec, {}, "compress", {**BASE, "compress.method": "pc", "compress.compression": 0.4,
                                               "train.steps": 3, "data.tokenizer": "model"})
    assert got == want
    assert got.optim.lr == field_default(RunSpec, "optim.lr") == 1e-3  # not the old 2**-12
    assert got.train.batch_size == dataclasses.fields(type(got.train))[2].default == 32
    args = build_parser().parse_args(["eval", "some/dir"])
    ev = _spec_from_flags(EvalSpec, args, "eval", {"model": "some/dir"})
    assert ev == EvalSpec(model="some/dir")


def test_each_flag_sets_its_field():
    _, spec = _compress("--lr", "0.01", "--batch-size", "8", "--micro-batch-size", "4", "--seed", "7",
                        "--no-residual", "--sides", "in", "--importance", "magnitude", "--distill", "0.5",
                        "--seq-len", "64", "--eval-batches", "2", "--ckpt-every", "0", "--threads", "1")
    assert (spec.optim.lr, spec.train.batch_size, spec.train.micro_batch_size) == (0.01, 8, 4)
    assert (spec.train.seed, spec.compress.importance_seed) == (7, 7)
    assert (spec.compress.residual, spec.compress.sides, spec.compress.importance) == (False, "in", "magnitude")
    assert (spec.compress.distill, spec.data.seq_len, spec.data.eval_batches) == (0.5, 64, 2)
    assert (spec.train.ckpt_every, spec.train.threads, spec.compress.compression) == (0, 1, 0.4)
    args = build_parser().parse_args(["eval", "d", "--tasks", "a,b", "--limit", "5", "--batch-size", "2"])
    ev = _spec_from_flags(EvalSpec, args, "eval", {"model": "d"})
    assert (ev.tasks, ev.limit, ev.batch_size) == (["a", "b"], 5, 2)


@pytest.mark.parametrize("flags,flag,needle", [
    (["--micro-batch-size", "3"], "--micro-batch-size", "must divide batch_size (32)"),
    (["--compression", "1.5"], "--compression", "(0, 1)"),
    (["--distill", "2"], "--distill", "[0, 1]"),
    (["--seq-len", "2"], "--seq-len", ">= 8"),
])
def test_a_refused_value_names_its_flag(flags, flag, needle):
    with pytest.raises(SpecError) as e:
        _compress(*flags)
    assert e.value.path == flag and needle in e.value.reason


def test_help_shows_the_spec_defaults():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices
    helps = {name: {o: a.help for a in sub[name]._actions for o in a.option_strings} for name in ("compress", "eval")}
    for flag, field in (("--lr", "optim.lr"), ("--batch-size", "train.batch_size"),
                        ("--eval-batches", "data.eval_batches"), ("--ckpt-every", "train.ckpt_every")):
        assert helps["compress"][flag].endswith(f"(default: {field_default(RunSpec, field)})"), flag
    assert helps["eval"]["--tasks"].endswith("(default: pcb_cloze,pcb_continuation)")
    assert helps["eval"]["--batch-size"].endswith(f"(default: {field_default(EvalSpec, 'batch_size')})")
