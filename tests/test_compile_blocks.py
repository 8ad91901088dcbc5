"""Per-decoder-layer `torch.compile` (`parallel.compile_blocks`, `train.compile`): compiled training
gives the eager losses within tolerance, with no recompile after the first step over 10 steps, for
HPR and for PC (W_c written in place into the compiled small network before every step), and SDPA
never receives a dense mask (attn_mask None, is_causal True: flash attention on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcbench.spec import methods
from pcbench.bench import step_cost
from pcbench.spec.config import CompressSpec, RunSpec
from pcbench.train import distributed, parallel
from pcbench.train.loop import Stepper

STEPS = 10
VOCAB, SEQ, ROWS = 97, 16, 4


def _train(method: str, compile_, calls: list) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    base, plan = step_cost.build_base("llama-tiny", VOCAB, SEQ, 0.5, seed=0)
    spec = RunSpec(compress=CompressSpec(method=method))
    tr = methods.build(method, base, plan, spec, torch.device("cpu"))
    tr.model.train()
    env = distributed.DistEnv(0, 1, 0, torch.device("cpu"))
    par = parallel.Replicated(tr, env, compile=compile_)
    opt = torch.optim.AdamW(tr.param_groups(0.1), lr=3e-3)
    stepper = Stepper(tr, par.net, opt, None, micro=2, env=env, par=par)
    from torch._dynamo.utils import counters

    counters.clear()
    out, graphs = [], []
    for step in range(STEPS):
        batch = step_cost.fixed_batch(ROWS, SEQ, VOCAB, seed=step, device=torch.device("cpu"))
        out.append(stepper(batch, step)[0])
        graphs.append(sum(counters["stats"].values()) and counters["stats"]["unique_graphs"])
        if step == 0 and compile_:
            calls.clear()  # what the compiled steps' SDPA calls get
            torch._dynamo.config.error_on_recompile = True  # any recompile from step 2 on fails the step
    torch._dynamo.config.error_on_recompile = False
    return out, {"graphs": graphs, "recompiles": dict(counters["recompiles"])}


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    @torch.compiler.disable  # run (and record) at every call, compiled or not; never traced (no guards on `calls`)
    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is None, bool(is_causal)))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    yield calls
    torch._dynamo.reset()


def _check(method: str, backend: str, calls: list, rtol: float):
    torch._dynamo.reset()
    eager, _ = _train(method, False, calls)
    assert calls and all(c == (True, True) for c in calls), calls[:4]  # eager: no mask, causal
    calls.clear()
    compiled, info = _train(method, {"backend": backend}, calls)
    print(method, backend, "eager", eager[-1], "compiled", compiled[-1], info)
    assert calls and all(c == (True, True) for c in calls), calls[:4]  # compiled: still no dense mask
    # every unique graph exists after step 1 (one per layer code path), none is added later
    assert info["graphs"][0] >= 1 and info["graphs"][-1] == info["graphs"][0], info["graphs"]
    assert not info["recompiles"]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=rtol, atol=0)
    return eager, compiled


@pytest.mark.parametrize("method", ["hpr", "pc"])
def test_per_block_compile_matches_eager_without_recompiles_or_masks(method, sdpa_calls):
    # aot_eager: dynamo's capture and AOT autograd, the same ops as eager (so ~bitwise)
    _check(method, "aot_eager", sdpa_calls, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hpr", "pc"])
def test_per_block_inductor_matches_eager(method, sdpa_calls):
    _check(method, "inductor", sdpa_calls, rtol=2e-4)


def test_compile_blocks_keeps_names_and_compiles_each_layer():
    base, plan = step_cost.build_base("llama-tiny", VOCAB, SEQ, 0.5, seed=0)
    names = [n for n, _ in base.named_parameters()]
    layers = parallel.compile_blocks(base, backend="eager")
    assert len(layers) == base.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert [n for n, _ in base.named_parameters()] == names  # no `_orig_mod.`: checkpoints, PC's names
    assert base._compiled_call_impl is None  # the model's own forward (the mask) stays eager
