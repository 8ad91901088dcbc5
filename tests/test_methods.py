"""The compression-method registry (`pcbench.spec.methods`): `pc-naive` (autograd through P.W.P every
micro-batch) trains to the same losses and export as cost-free `pc` through the real CLI and loop;
config, grids and the CLI accept exactly the registered names; an unknown one is one clear line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pcbench import cli

from pcbench.spec import methods
from pcbench.util.atomic import read_jsonl
from pcbench.spec.config import SpecError, load_run_spec

# fp32 on CPU: the two paths run the same products but sum micro-batch gradients in a different
# order (pc: G summed, then pushed; pc-naive: each micro-batch's dP summed), so equal to rounding.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny exported checkpoint (gpt2-nano, tied embeddings, bpe-512), seeded and untrained."""
    from pcbench.spec.config import ModelSpec
    from pcbench.models import build_config, build_model
    from pcbench.data.tokenizer import load_tokenizer
    from pcbench.train.loop import export_model

    tok = load_tokenizer("bpe-512")
    model = build_model(build_config(ModelSpec(name="gpt2-nano"), 512, 32, tok.bos_token_id, tok.eos_token_id),
                        seed=0)
    out = tmp_path_factory.mktemp("base") / "model"
    export_model(model, tok, out)
    return out


def run_spec(base: Path, method: str) -> dict:
    """6 steps of 2 micro-batches from `base`, a loss line every step, held-out loss every 2 steps."""
    return {"model": {"name": "hf", "path": str(base)},
            "data": {"corpus": "books", "tokenizer": "model", "seq_len": 32, "eval_batches": 2},
            "train": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "log_every": 1, "eval_every": 2,
                      "ckpt_every": 0, "threads": 1, "device": "cpu"},
            "optim": {"lr": 0.003, "warmup": 0},
            "compress": {"method": method, "compression": 0.5}}


def trained(base: Path, tmp: Path, method: str) -> dict:
    """Train `method` through `train.train`: per-step metric lines, final record, exported weights."""
    from safetensors.torch import load_file

    from pcbench.train.loop import RunPaths, train

    p = RunPaths(record=tmp / method / "record", work=tmp / method / "work")
    final = train(load_run_spec(run_spec(base, method)), p, progress=False)
    return {"metrics": read_jsonl(p.metrics), "final": final, "weights": load_file(str(p.model / "model.safetensors"))}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, w in b.items():
        torch.testing.assert_close(a[k], w, rtol=RTOL, atol=ATOL, msg=k)


def test_pc_naive_trains_to_the_losses_and_export_of_pc(base_model, tmp_path):
    pc = trained(base_model, tmp_path, "pc")
    naive = trained(base_model, tmp_path, "pc-naive")
    lp, ln = ([r["loss"] for r in x["metrics"]] for x in (pc, naive))
    assert len(lp) == len(ln) == 6
    assert ln[0] == lp[0]  # step 1's forward: the same W_c, bit for bit
    torch.testing.assert_close(torch.tensor(ln), torch.tensor(lp), rtol=RTOL, atol=ATOL)
    assert lp[-1] < lp[0]  # it trained
    for key in ("grad_norm", "heldout_loss"):  # held-out during training: the small network is kept current
        got, want = ([r[key] for r in x["metrics"] if key in r] for x in (naive, pc))
        assert len(want) == (3 if key == "heldout_loss" else 6)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=RTOL, atol=ATOL)
    assert_same_weights(naive["weights"], pc["weights"])
    assert naive["final"]["heldout_loss"] == pytest.approx(pc["final"]["heldout_loss"], rel=RTOL)
    assert naive["final"]["kind"] == "pc-naive" and pc["final"]["kind"] == "pc"
    # the naive path pays a materialisation and its backward per micro-batch (2 here), pc one per step
    assert naive["final"]["fixed_flops_per_step"] > pc["final"]["fixed_flops_per_step"]


def test_compress_cli_takes_pc_naive(base_model, tmp_path, capsys):
    from safetensors.torch import load_file

    out = {}
    for method in ("pc", "pc-naive"):
        argv = ["compress", "--base", str(base_model), "--method", method, "--compression", "0.5", "--steps", "3",
                "--out", str(tmp_path / method), "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "4",
                "--lr", "0.003", "--eval-batches", "1", "--threads", "1"]
        assert cli.main(argv) == 0
        out[method] = json.loads(capsys.readouterr().out)
        assert out[method]["method"] == method
    assert out["pc-naive"]["train_loss_last100"] == pytest.approx(out["pc"]["train_loss_last100"], rel=RTOL)
    assert_same_weights(load_file(str(tmp_path / "pc-naive" / "model.safetensors")),
                        load_file(str(tmp_path / "pc" / "model.safetensors")))


def test_pc_naive_network_differentiates_through_the_projections():
    from pcbench.bench import step_cost

    base, plan = step_cost.build_base("llama-tiny", 97, 16, 0.5, seed=0)
    spec = load_run_spec({"model": {"name": "llama-tiny", "path": "x"}, "compress": {"method": "pc-naive"}})
    naive = methods.build("pc-naive", base, plan, spec, torch.device("cpu"))
    pc = methods.build("pc", base, plan, spec, torch.device("cpu"))
    assert pc.network is pc.model and naive.network is not naive.model
    batch = step_cost.fixed_batch(2, 16, 97, 0, torch.device("cpu"))
    naive.network(input_ids=batch[:, :-1]).logits.float().mean().backward()
    assert all(p.grad is not None for t in naive.tensors.values() for p in t.parameters(recurse=False))
    small = dict(naive.model.named_parameters())
    assert all(small[n].grad is None for n in naive.names.values())  # W_c is computed, never trained
    assert all(p.grad is not None for _, p in naive._direct_params())  # norms, biases: trained directly


GRID = {
    "name": "t",
    "defaults": {"data": {"tokenizer": "bpe-512", "seq_len": 32}, "train": {"batch_size": 4}},
    "stages": {
        "base": {"spec": {"model": {"name": "gpt2-nano"}, "train": {"steps": 3}}},
        "compress": {"from": "base", "axes": {"method": methods.names()},
                     "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                              "compress": {"method": "${method}"}, "train": {"steps": 3}}},
    },
}


def test_registry_names_are_what_config_grids_and_the_cli_accept():
    from pcbench.grid import GridSpec, expand, from_dict

    assert methods.names() == ["hpr", "pc", "pc-naive"]
    assert methods.COMPARED == ("hpr", "pc") and set(methods.COMPARED) <= set(methods.METHODS)
    for name in methods.names():
        spec = load_run_spec({"model": {"name": "hf", "path": "x"}, "compress": {"method": name}})
        assert spec.kind == name
    g = expand(from_dict(GridSpec, copy.deepcopy(GRID), "grid"))
    assert sorted(r.spec.compress.method for r in g.runs if r.stage == "compress") == sorted(methods.names())
    action = next(a for sp in _subparsers(cli.build_parser()) if sp.prog.endswith(" compress")
                  for a in sp._actions if "--method" in a.option_strings)
    assert list(action.choices) == methods.names()
    args = cli.build_parser().parse_args(["compress", "--base", "b", "--method", "pc-naive", "--compression",
                                          "0.5", "--steps", "0", "--out", "o"])
    assert args.method == "pc-naive"


def _subparsers(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            yield from a.choices.values()


def test_unknown_method_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SpecError) as e:
        load_run_spec({"model": {"name": "hf", "path": "x"}, "compress": {"method": "pc_naive"}})
    assert e.value.path == "spec.compress.method"
    assert str(e.value) == ("spec.compress.method: unknown method 'pc_naive' (did you mean 'pc-naive'?); "
                            "known: hpr, pc, pc-naive")
    with pytest.raises(methods.UnknownMethod, match=r"did you mean 'hpr'\?"):
        methods.get("hrp")
    with pytest.raises(SystemExit) as ex:
        cli.main(["compress", "--base", "b", "--method", "pcc", "--compression", "0.5", "--steps", "0",
                  "--out", "o"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert "unknown method 'pcc' (did you mean 'pc'?); known: hpr, pc, pc-naive" in line
    assert "Traceback" not in err


@pytest.mark.parametrize("edit,field", [
    (lambda d: d["train"].update(parallel="fsdp"), "spec.train.parallel"),
    (lambda d: d["optim"].update(clip="compressed"), "spec.optim.clip"),
    (lambda d: d["compress"].update(blockwise_step=True), "spec.compress.blockwise_step"),
])
def test_pc_naive_refuses_what_needs_the_push(edit, field):
    d = {"model": {"name": "hf", "path": "x"}, "compress": {"method": "pc-naive"}, "train": {"steps": 1},
         "optim": {}}
    edit(d)
    with pytest.raises(SpecError) as e:
        load_run_spec(d)
    assert e.value.path == field
    d["compress"]["method"] = "pc"
    if field != "spec.compress.blockwise_step":  # (block-wise also needs a compressed clip)
        load_run_spec(d)


def test_registry_module_is_torch_free_and_builders_are_lazy():
    import subprocess
    import sys

    code = ("import sys, pcbench.spec.methods as m; print(m.label('pc'), m.label('pc-naive'), m.label('x'), "
            "'torch' in sys.modules, any(k.startswith('pcbench.spec.methods.') for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PC", "PC-naive", "x", "False", "False"]


def test_compress_order_reaches_every_projected_tensor_and_a_bad_one_is_one_line():
    """`compress.order` (spec) -> `Projected(order=...)`: flops routes where they are cheaper; the
    default stays autograd's; an unknown order names the field before any work."""
    from pcbench.bench import step_cost

    base, plan = step_cost.build_base("llama-bench", 97, 16, 0.5, seed=0)
    built = {}
    for order in ("autograd", "flops"):
        spec = load_run_spec({"model": {"name": "llama-bench", "path": "x"}, "compress": {"order": order}})
        built[order] = methods.build("pc", base, plan, spec, torch.device("cpu"))
        assert {t.order for t in built[order].tensors.values()} == {order}
    assert load_run_spec({"model": {"name": "hf", "path": "x"}, "compress": {}}).compress.order == "autograd"
    two = [k for k, t in built["flops"].tensors.items() if t.p_out is not None and t.p_in is not None]
    assert any(built["flops"].tensors[k].route() != built["autograd"].tensors[k].route() for k in two)
    assert built["flops"].fixed_flops_per_step() < built["autograd"].fixed_flops_per_step()
    with pytest.raises(SpecError) as e:
        load_run_spec({"model": {"name": "hf", "path": "x"}, "compress": {"order": "fast"}})
    assert e.value.path == "spec.compress.order"
