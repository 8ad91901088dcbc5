"""The CUDA path (`pytest -m cuda`; every test skips without a CUDA GPU): PC == HPR at step 0 in
fp32, cost-free gradients == autograd through P.W.P, a bf16-autocast step of HPR and PC close to
fp32, checkpoint and resume, an export written from GPU memory that loads on CPU with equal logits.

`PCBENCH_CUDA_TESTS_DEVICE=cpu` runs the same tests on the CPU, to check their own logic on a
machine without a GPU (run by `bash scripts/gpu-check.sh`, part 1).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from pcbench.train import checkpoint
from pcbench.bench.step_cost import build_method, fixed_batch
from pcbench.compress import importance
from pcbench.compress.plan import make_plan
from pcbench.compress.projected import Projected
from pcbench.compress.prune import prune
from pcbench.train.loop import _rng_state, _set_rng_state, amp_ctx, export_model
from test_compress import MODELS, VOCAB, _perturb, calib, cost_free_and_autograd_grads

DEVICE = os.environ.get("PCBENCH_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU")]


@pytest.fixture
def dev():
    """The device, with fp32 matmuls in full fp32 (no TF32) for the exactness tests."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device(DEVICE)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are 0)."""
    got, want = got.double().cpu(), want.double().cpu()
    den = want.norm()
    return float((got - want).norm() / den) if den > 0 else float(got.norm())


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("kind", importance.KINDS)
def test_pc_equals_hpr_at_step_zero_on_cuda(dev, family, kind):
    """fp32 on the device: the materialised PC network is bit-identical to the pruned one."""
    m = MODELS[family]()
    plan = make_plan(m, 0.5, importance.score(m, kind, seed=4, batches=calib()))
    hpr = prune(m, plan).to(dev)
    ids = calib(1)[0].to(dev)
    ref = hpr(input_ids=ids).logits
    for sides in ("in", "out", "both"):
        pc = Projected(m, plan, sides=sides, residual=True).place(dev)
        pc.before_step()
        assert all(t.p_in is None or t.p_in.device.type == dev.type for t in pc.tensors.values())
        for (n1, p1), (n2, p2) in zip(hpr.named_parameters(), pc.model.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2), (sides, n1)
        assert torch.equal(pc.model(input_ids=ids).logits, ref), sides


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("sides,residual", [("both", True), ("both", False), ("in", True), ("out", True)])
def test_cost_free_gradients_equal_autograd_on_cuda(dev, family, sides, residual):
    """fp32 on the device: gradients pushed into P/R (and the norms) equal autograd through
    P_out W P_in + R inside the forward, accumulated over micro-batches (relative error < 1e-4)."""
    torch.manual_seed(0)
    m = MODELS[family]()
    plan = make_plan(m, 0.5, importance.random(m, 1))
    pc = Projected(m, plan, sides=sides, residual=residual)
    _perturb(pc, 2)  # on the CPU (its generator), then both copies move to the device
    ref = copy.deepcopy(pc)
    pc.place(dev)
    ref.place(dev)
    got, want = cost_free_and_autograd_grads(pc, ref, [ids.to(dev) for ids in calib(n=3, rows=2, seq=9, seed=5)])
    assert set(got) == set(want) and len(got) > 0
    assert all(g.device.type == dev.type for g in got.values())
    errs = {k: rel_err(got[k], want[k]) for k in want}
    assert max(errs.values()) < 1e-4, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


def _stepper(method: str, dev, micro: int = 2, lr: float = 1e-2, seed: int = 0):
    m = MODELS["llama"]()
    plan = make_plan(m, 0.5, importance.random(m, seed))
    return build_method(method, m, plan, dev, lr, 20, micro)


@pytest.mark.parametrize("method", ["hpr", "pc"])
def test_bf16_autocast_step_is_finite_and_close_to_fp32(dev, method):
    """Three optimiser steps under bf16 autocast track fp32 (loss within 2%, grad norm within 10%)."""
    batch = fixed_batch(4, 24, VOCAB, 0, dev)
    runs = {}
    for precision in ("fp32", "bf16"):
        trainable, stepper = _stepper(method, dev)
        stepper.amp = amp_ctx(dev, precision)
        runs[precision] = [stepper(batch, i) for i in range(3)]
        assert all(p.dtype == torch.float32 for p in trainable.parameters())  # autocast, fp32 weights
    for (l32, g32), (l16, g16) in zip(runs["fp32"], runs["bf16"]):
        assert torch.isfinite(torch.tensor([l16, g16])).all()
        assert l16 == pytest.approx(l32, rel=2e-2) and g16 == pytest.approx(g32, rel=0.1)
    assert runs["bf16"][-1][0] < runs["bf16"][0][0]  # it learns the fixed batch


@pytest.mark.parametrize("method", ["hpr", "pc"])
def test_checkpoint_resume_on_cuda(dev, method, tmp_path):
    """Save after 3 of 6 steps (what `train` saves: trainable, optimiser, schedule, RNG), load into
    freshly built objects with map_location=device, and finish: the uninterrupted run's losses and
    weights (to fp32 round-off: GPU kernels need not be bitwise deterministic)."""
    batches = [fixed_batch(4, 24, VOCAB, s, dev) for s in range(6)]

    def state(tr, st):
        return {"trainable": tr.state_dict(), "optimizer": st.opt.state_dict(), "scheduler": st.sched.state_dict(),
                "rng": _rng_state(), "step": 3}

    torch.manual_seed(7)
    tr, st = _stepper(method, dev)
    full = [st(b, i)[0] for i, b in enumerate(batches)]
    want = {k: v.detach().clone() for k, v in tr.state_dict().items()}

    torch.manual_seed(7)
    tr, st = _stepper(method, dev)
    first = [st(b, i)[0] for i, b in enumerate(batches[:3])]
    checkpoint.save(tmp_path / "ckpt", 3, state(tr, st))
    del tr, st
    tr, st = _stepper(method, dev)
    saved, problems = checkpoint.load_latest(tmp_path / "ckpt", map_location=dev)
    assert saved is not None and not problems and saved["step"] == 3
    assert all(v.device.type == dev.type for v in saved["trainable"].values())
    tr.load_state_dict(saved["trainable"])
    st.opt.load_state_dict(saved["optimizer"])
    st.sched.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    rest = [st(b, 3 + i)[0] for i, b in enumerate(batches[3:])]
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(full), rtol=1e-5, atol=1e-6)
    got = tr.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def _tokenizer(vocab: int):
    """A word-level fast tokenizer of `vocab` ids, built here (no download)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["<eos>"] = vocab - 1
    backend = Tokenizer(tok_models.WordLevel(words, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="w0")


@pytest.mark.parametrize("family", ["gpt2", "llama-tied"])
def test_export_from_gpu_loads_on_cpu_with_equal_logits(dev, family, tmp_path):
    """PC trained a few bf16 steps on the device, exported straight from device memory: the
    checkpoint loads on the CPU as a stock model whose weights equal the device's and whose logits
    equal the device model's moved to the CPU (and its device logits to fp32 round-off)."""
    from transformers import AutoModelForCausalLM

    m = MODELS[family]()
    plan = make_plan(m, 0.5, importance.random(m, 0))
    trainable, stepper = build_method("pc", m, plan, dev, 1e-2, 20, 2)
    stepper.amp = amp_ctx(dev, "bf16")
    for i in range(3):
        stepper(fixed_batch(4, 24, VOCAB, i, dev), i)
    model = trainable.export()
    assert next(model.parameters()).device.type == dev.type
    export_model(model, _tokenizer(VOCAB), tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=False).eval()
    assert type(reloaded) is type(m) and next(reloaded.parameters()).device.type == "cpu"
    assert reloaded.config.tie_word_embeddings == m.config.tie_word_embeddings
    device_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, device_state[k]), k
    ids = calib(1)[0]
    model.eval()
    on_cpu = copy.deepcopy(model).to("cpu")
    with torch.no_grad():
        cpu_logits = reloaded(input_ids=ids).logits
        assert torch.equal(cpu_logits, on_cpu(input_ids=ids).logits)
        dev_logits = model(input_ids=ids.to(dev)).logits.cpu()
    assert rel_err(dev_logits, cpu_logits) < 1e-4
