"""Merge/export: PC and HPR results are stock HF checkpoints of the planned size and cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pcbench.compress import importance
from pcbench.compress.plan import make_plan
from pcbench.compress.projected import Projected
from pcbench.compress.prune import prune
from pcbench.spec.config import ModelSpec
from pcbench.models import build_config, build_model, count_params, flops_per_token
from pcbench.data.tokenizer import load_tokenizer
from pcbench.train.loop import Stepper, export_model
from pcbench.compress.trainable import Direct

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,tied", [("gpt2-tiny", False), ("llama-tiny", True)])
def test_exported_pc_model_matches_plan_cost_and_reloads(tmp_path, name, tied):
    tok = load_tokenizer("bpe-512")
    cfg = build_config(ModelSpec(name=name), 512, 64, tok.bos_token_id, tok.eos_token_id)
    cfg.tie_word_embeddings = tied
    base = build_model(cfg, seed=1)
    plan = make_plan(base, 0.5, importance.random(base, 0))
    pc = Projected(base, plan)
    hpr = Direct(prune(base, plan))
    g = torch.Generator().manual_seed(0)
    for t in (pc, hpr):  # a few real steps so the export is not the initial point
        opt = torch.optim.AdamW([p for gr in t.param_groups(0.1) for p in gr["params"]], lr=1e-2)
        step = Stepper(t, t.model, opt, None, micro=2)
        for i in range(3):
            step(torch.randint(0, 512, (4, 17), generator=g), i)
    model = pc.export()
    out = tmp_path / "pc"
    export_model(model, tok, out)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors" in files and "tokenizer.json" in files
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert type(reloaded) is type(base)
    assert count_params(reloaded)["total"] == plan.params_after
    assert sum(t.numel() for t in load_file(str(out / "model.safetensors")).values()) == \
        plan.params_after  # a tied head is stored once
    assert flops_per_token(reloaded.config, 64) == flops_per_token(hpr.model.config, 64)
    assert reloaded.config.hidden_size == plan.widths["d_model"]
    assert reloaded.config.intermediate_size == plan.widths["d_ff"]
    ids = torch.randint(0, 512, (2, 20), generator=g)
    model.eval()
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # Training moved PC away from HPR's initial point.
    assert not torch.equal(pc.model.model.embed_tokens.weight, prune(base, plan).model.embed_tokens.weight)


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_cli_compress_steps_zero_pc_equals_hpr(tmp_path):
    """Through the whole CLI: with --steps 0, PC and HPR export identical checkpoints."""
    from pcbench.train.loop import RunPaths, train
    from pcbench.spec.config import load_run_spec

    base_spec = load_run_spec({"model": {"name": "gpt2-nano"},
                               "data": {"tokenizer": "bpe-512", "seq_len": 32, "eval_batches": 1},
                               "train": {"steps": 5, "batch_size": 4, "threads": 1}})
    base = tmp_path / "base"
    train(base_spec, RunPaths(record=base / "r", work=base / "w", export=base / "model"), progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outs = {}
    for method in ("hpr", "pc"):
        out = tmp_path / method
        r = subprocess.run([sys.executable, "-m", "pcbench.cli", "compress", "--base", str(base / "model"),
                            "--method", method, "--compression", "0.5", "--steps", "0", "--out", str(out),
                            "--seq-len", "32", "--importance", "magnitude", "--eval-batches", "1"],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads(r.stdout[r.stdout.index("{"):])
        assert summary["achieved"] == pytest.approx(0.5, abs=0.1)
        outs[method] = load_file(str(out / "model.safetensors"))
    assert outs["hpr"].keys() == outs["pc"].keys()
    assert all(torch.equal(outs["hpr"][k], outs["pc"][k]) for k in outs["hpr"])


def test_cli_compress_refuses_a_bad_base(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pcbench.cli", "compress", "--base", str(tmp_path / "nope"),
                        "--method", "pc", "--compression", "0.5", "--steps", "1", "--out", str(tmp_path / "o")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--base" in r.stderr and "neither a checkpoint directory nor a preset" in r.stderr
