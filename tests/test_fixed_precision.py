"""PC's fixed part (materialise, push) at `compress.fixed_precision` fp32 | tf32 | bf16, each measured
against a float64 reference: W_c and the pushed P_out/P_in/R gradients. On CPU tf32 is fp32 (there
are no TF32 products; the switch is CUDA's `allow_tf32`, asserted on during the products). Also:
`auto` resolves per device, the new field leaves run ids alone, AdamW is fused on CUDA only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pcbench.compress import projected as pj
from pcbench.compress.projected import ProjectedTensor, resolve_fixed_precision
from pcbench.train.loop import adamw_options

ROOT = Path(__file__).resolve().parents[1]

# Relative Frobenius errors vs float64 allowed (measured on CPU, 2026-12-07: fp32 ~1e-7; bf16 ~2-3e-3,
# the rounding of its operands to 8 bits of mantissa; see `errors` below, printed with -s).
TOL = {"fp32": 1e-6, "tf32": 1e-6, "bf16": 1e-2}


def _tensor(precision: str, order: str, dtype=torch.float32, seed: int = 0) -> ProjectedTensor:
    """A two-sided tensor with trained-looking P (one-hot + noise) and R, in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 80, generator=g, dtype=torch.float64)
    keep = [torch.randperm(96, generator=g)[:64].sort().values, torch.randperm(80, generator=g)[:48].sort().values]
    t = ProjectedTensor(w.to(dtype), keep, (True, True), residual=True, base_dtype=dtype, order=order,
                        precision=precision)
    with torch.no_grad():
        for p in (t.p_out, t.p_in, t.residual):
            p.data = p.data.to(dtype) + 3e-3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
    t.base = w.to(dtype)
    return t


def _run(t: ProjectedTensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    out = torch.empty(t.small_shape, dtype=t.p_out.dtype)
    wc = t.step_weight(cache=True, out=out).clone()
    t.push(grad.to(t.p_out.dtype))
    return {"w_c": wc, "p_out": t.p_out.grad, "p_in": t.p_in.grad, "residual": t.residual.grad}


def errors(precision: str, order: str) -> dict[str, float]:
    ref_t = _tensor("fp32", order, torch.float64)
    grad = torch.randn(ref_t.small_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _run(ref_t, grad)
    got = _run(_tensor(precision, order), grad)
    return {k: float((got[k].double() - ref[k]).norm() / ref[k].norm()) for k in ref}


@pytest.mark.parametrize("order", ["autograd", "flops"])
def test_each_precision_is_within_its_tolerance_of_float64(order):
    errs = {p: errors(p, order) for p in pj.PRECISIONS}
    print(order, {p: {k: f"{v:.2e}" for k, v in e.items()} for p, e in errs.items()})
    for p, e in errs.items():
        for k, v in e.items():
            assert v <= TOL[p], f"{p} {k}: relative error {v:.2e} > {TOL[p]:.0e}"
    assert errs["tf32"] == errs["fp32"]  # CPU: no TF32, the same products
    # bf16 did round: its error is that of 8-bit operands, far above fp32's (P/R grads included)
    assert all(errs["bf16"][k] > 100 * errs["fp32"][k] for k in ("w_c", "p_out", "p_in"))
    assert all(v > 1e-4 for v in errs["bf16"].values() if v != errs["bf16"]["residual"])


def test_bf16_results_are_fp32_and_gradients_accumulate_in_fp32():
    t = _tensor("bf16", "autograd")
    grad = torch.randn(t.small_shape, generator=torch.Generator().manual_seed(2))
    out = _run(t, grad)
    assert all(v.dtype == torch.float32 for v in out.values())
    first = t.p_out.grad.clone()
    t.step_weight(cache=True)
    t.push(grad)  # a second push adds in fp32
    torch.testing.assert_close(t.p_out.grad, 2 * first)


def test_fp32_is_bitwise_the_default_path():
    a, b = _tensor("fp32", "autograd"), _tensor("fp32", "autograd")
    del b.precision  # the class default: what every existing run builds
    b.__dict__.pop("precision", None)
    grad = torch.randn(a.small_shape, generator=torch.Generator().manual_seed(3))
    ra, rb = _run(a, grad), _run(b, grad)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_tf32_turns_cuda_tf32_on_only_around_the_products(monkeypatch):
    seen = []
    real = pj._mm

    def spy(a, b, out=None):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(a, b, out)

    monkeypatch.setattr(pj, "_mm", spy)
    before = torch.backends.cuda.matmul.allow_tf32
    for precision, want in (("tf32", True), ("fp32", False)):
        seen.clear()
        t = _tensor(precision, "autograd")
        _run(t, torch.ones(t.small_shape))
        assert seen and all(s is want for s in seen), (precision, seen)
    assert torch.backends.cuda.matmul.allow_tf32 is before


def test_auto_resolves_per_device():
    assert resolve_fixed_precision("auto", "cpu") == "fp32"
    assert resolve_fixed_precision("auto", torch.device("cuda", 1)) == "tf32"
    assert resolve_fixed_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError):
        resolve_fixed_precision("fp16", "cpu")


def test_adamw_is_fused_on_cuda_only():
    assert adamw_options("cuda") == {"fused": True}
    assert adamw_options("cuda:3") == {"fused": True}
    assert adamw_options(torch.device("cpu")) == {}  # torch's default: the committed CPU studies bitwise


def test_default_study_run_ids_are_unchanged():
    """The fields added for CUDA (defaults that keep today's behaviour) leave every run id of the
    committed default study as it is."""
    from pcbench.grid import load_grid

    ids = {r.id for r in load_grid(ROOT / "experiments" / "default.yaml").runs}
    committed = {p.name for p in (ROOT / "results" / "default" / "runs").iterdir() if p.is_dir()}
    assert ids == committed and len(ids) == 38


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 mantissa bits, round to nearest), as tensor cores read their operands."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def test_emulated_tf32_lies_between_fp32_and_bf16(monkeypatch):
    """What tf32 gives on CUDA, emulated on CPU (operands rounded to TF32, fp32 products): the
    expected error of the CUDA default, between fp32's and bf16's."""
    real = pj._mm

    def tf32_mm(a, b, out=None):
        if a.dtype == torch.float64:  # the reference
            return real(a, b, out)
        r = torch.mm(_round_tf32(a), _round_tf32(b))
        return r if out is None else out.copy_(r)

    monkeypatch.setattr(pj, "_mm", tf32_mm)
    tf32 = errors("tf32", "autograd")  # the tf32 path, its products' operands rounded as on CUDA
    monkeypatch.undo()
    bf16, fp32 = errors("bf16", "autograd"), errors("fp32", "autograd")
    print("emulated tf32", {k: f"{v:.2e}" for k, v in tf32.items()})
    for k in ("w_c", "p_out", "p_in"):
        assert 10 * fp32[k] < tf32[k] < bf16[k] / 5
