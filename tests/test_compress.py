"""The math of compression: the map, plans, HPR == PC at step 0, cost-free gradients == autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from pcbench.compress import importance
from pcbench.compress.axes import index_set_sizes, tensor_axes
from pcbench.compress.plan import Plan, count_with_widths, make_plan, target_widths
from pcbench.compress.projected import Projected
from pcbench.compress.prune import prune
from pcbench.spec.config import ModelSpec
from pcbench.models import build_config, build_model, count_params

VOCAB = 97


def tiny(name: str = "llama-tiny", tied: bool = False, seed: int = 0, **over):
    cfg = build_config(ModelSpec(name=name, **over), VOCAB, 64, 0, 1)
    cfg.tie_word_embeddings = tied
    return build_model(cfg, seed=seed)


def calib(n=2, rows=3, seq=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, seq), generator=g) for _ in range(n)]


MODELS = {
    "llama": lambda: tiny("llama-tiny"),
    "gpt2": lambda: tiny("gpt2-tiny"),
    "llama-tied": lambda: tiny("llama-tiny", tied=True),
}


def test_map_covers_every_parameter_and_rejects_unknown():
    m = tiny("llama-tiny")
    axes = tensor_axes(m)
    assert set(axes) == {n for n, _ in m.named_parameters()}
    assert axes["model.layers.1.mlp.down_proj.weight"].dims == ("d_model", "d_ff.1")
    assert axes["model.layers.0.self_attn.k_proj.weight"].dims == (None, "d_model")
    assert index_set_sizes(m) == {"d_model": 64, "d_ff.0": 192, "d_ff.1": 192}
    m.model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="not in the compression map"):
        tensor_axes(m)


@pytest.mark.parametrize("level", [0.35, 0.5, 0.65, 0.9])
def test_plan_hits_the_requested_share(level):
    m = tiny("gpt2-tiny", d_model=128, d_ff=512, head_dim=32)
    w = target_widths(m, level)
    assert w["d_ff"] * 128 == pytest.approx(w["d_model"] * 512, abs=128)  # ratio kept
    plan = make_plan(m, level, importance.random(m, 0))
    small = prune(m, plan)
    assert count_params(small)["total"] == plan.params_after
    assert w["d_model"] % m.config.num_attention_heads == 0  # transformers refuses other widths
    # The best achievable width is within one d_model step (= the head count here) of the target.
    step = count_with_widths(m, {"d_model": w["d_model"] + 4, "d_ff": w["d_ff"] + 16}) - plan.params_after
    assert abs(plan.params_after - (1 - level) * plan.params_before) <= step
    assert abs(plan.achieved - level) < 0.03


def test_plan_rejects_impossible_levels():
    m = tiny()
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="compression"):
            target_widths(m, bad)


def test_magnitude_scores_by_hand():
    m = tiny("gpt2-tiny", layers=1)
    params = dict(m.named_parameters())
    s = importance.magnitude(m)
    cols = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.mlp.up_proj.weight"]
    rows = ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    expect = sum(params[n].norm(dim=0) for n in cols) + sum(params[n].norm(dim=1) for n in rows)
    torch.testing.assert_close(s["d_model"], expect / 8)
    ff = (params["model.layers.0.mlp.up_proj.weight"].norm(dim=1)
          + params["model.layers.0.mlp.down_proj.weight"].norm(dim=0)) / 2
    torch.testing.assert_close(s["d_ff.0"], ff)


def test_magnitude_and_activation_keep_a_dominant_dimension():
    m = tiny("llama-tiny")
    with torch.no_grad():
        for layer in m.model.layers:  # make d_model index 5 huge in every norm and matrix column
            layer.input_layernorm.weight[5] = 50.0
            layer.post_attention_layernorm.weight[5] = 50.0
            layer.mlp.up_proj.weight[7] *= 40  # and d_ff unit 7 of every layer
        m.model.embed_tokens.weight[:, 5] *= 40
    for kind, kw in (("magnitude", {}), ("activation", {"batches": calib()})):
        s = importance.score(m, kind, **kw)
        plan = make_plan(m, 0.65, s)
        assert 5 in plan.keep["d_model"].tolist(), kind
        assert 7 in plan.keep["d_ff.0"].tolist() and 7 in plan.keep["d_ff.1"].tolist(), kind


def test_random_importance_is_seeded_and_really_random():
    m = tiny()
    a, b, c = importance.random(m, 1), importance.random(m, 1), importance.random(m, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["d_model"], c["d_model"])
    keep = make_plan(m, 0.5, a).keep["d_model"]
    assert keep.tolist() != list(range(len(keep)))  # not just the first indices


def test_unknown_importance_kind():
    with pytest.raises(ValueError, match="unknown importance"):
        importance.score(tiny(), "entropy")


def test_plan_roundtrip():
    m = tiny()
    plan = make_plan(m, 0.5, importance.random(m, 3))
    again = Plan.from_dict(plan.to_dict())
    assert again.widths == plan.widths and again.achieved == plan.achieved
    assert all(torch.equal(again.keep[k], plan.keep[k]) for k in plan.keep)


VARIANTS = [(s, r) for s in ("in", "out", "both") for r in (True, False)]


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("kind", importance.KINDS)
def test_pc_equals_hpr_at_step_zero(family, kind):
    """Bit-identical weights and logits for every importance kind, side and residual switch."""
    m = MODELS[family]()
    scores = importance.score(m, kind, seed=4, batches=calib())
    plan = make_plan(m, 0.5, scores)
    hpr = prune(m, plan)
    ids = calib(1)[0]
    ref = hpr(input_ids=ids).logits
    for sides, residual in VARIANTS:
        pc = Projected(m, plan, sides=sides, residual=residual)
        pc.before_step()
        for (n1, p1), (n2, p2) in zip(hpr.named_parameters(), pc.model.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2), (sides, residual, n1)
        assert torch.equal(pc.model(input_ids=ids).logits, ref), (sides, residual)
        exported = pc.export()
        assert type(exported) is type(hpr) and exported.config.hidden_size == hpr.config.hidden_size


def _perturb(pc: Projected, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pc.tensors.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for n, p in pc.model.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _grads(pc: Projected) -> dict[str, torch.Tensor]:
    out = {f"t.{n}": p.grad.clone() for n, p in pc.tensors.named_parameters()}
    projected = set(pc.names.values())
    out.update({f"m.{n}": p.grad.clone() for n, p in pc.model.named_parameters() if n not in projected})
    return out


def cost_free_and_autograd_grads(pc: Projected, ref: Projected, micro: list[torch.Tensor]):
    """(`_grads` of `pc` after the cost-free step, of `ref` after autograd through P.W.P inside
    every forward), accumulated over the micro-batches `micro` (also used by test_cuda)."""

    def loss_of(logits, ids):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    pc.before_step()
    for ids in micro:
        (loss_of(pc.model(input_ids=ids).logits, ids) / len(micro)).backward()
    pc.after_backward()
    for ids in micro:
        (loss_of(ref.reference_logits(ids), ids) / len(micro)).backward()
    return _grads(pc), _grads(ref)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("sides,residual", VARIANTS)
def test_cost_free_gradients_equal_autograd_through_projections(family, sides, residual):
    """Gradients reaching P, R (and norms) via the small network equal autograd through
    P_out W P_in + R inside the forward, with accumulation over several micro-batches."""
    torch.manual_seed(0)
    m = MODELS[family]().double()
    plan = make_plan(m, 0.5, importance.random(m, 1))
    pc = Projected(m, plan, sides=sides, residual=residual).double()
    _perturb(pc, 2)  # away from one-hot so every term of the chain rule matters
    ref = copy.deepcopy(pc)
    got, want = cost_free_and_autograd_grads(pc, ref, calib(n=3, rows=2, seq=9, seed=5))
    assert set(got) == set(want) and len(got) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11, msg=k)
    # The small network's projected weights hold no stale gradient after the push.
    small = dict(pc.model.named_parameters())
    assert all(small[n].grad is None for n in pc.names.values())


def test_one_sided_variants_train_the_right_projections():
    m = tiny()
    plan = make_plan(m, 0.5, importance.random(m, 0))
    up = "model__layers__0__mlp__up_proj__weight"
    q = "model__layers__0__self_attn__q_proj__weight"
    for sides, has_out, has_in in (("in", False, True), ("out", True, False), ("both", True, True)):
        pc = Projected(m, plan, sides=sides, residual=False)
        t = pc.tensors[up]  # both dims compressed: sides decides
        assert (t.p_out is not None, t.p_in is not None) == (has_out, has_in)
        assert pc.tensors[q].p_in is not None and pc.tensors[q].p_out is None  # single compressed dim
    with pytest.raises(ValueError, match="sides"):
        Projected(m, plan, sides="left")


def test_recovery_metric_moves_when_projections_leave_the_kept_set():
    m = tiny()
    plan = make_plan(m, 0.5, importance.random(m, 0))
    pc = Projected(m, plan)
    assert all(v == 0.0 for v in pc.step_metrics(0).values())
    t = pc.tensors["model__layers__0__mlp__down_proj__weight"]
    dropped = plan.dropped("d_model", 64)
    with torch.no_grad():
        t.p_out[0, dropped[0]] = 1.0  # one unit of mass on a dropped index, next to one kept unit
    frac = t.dropped_mass()["out"]
    assert frac == pytest.approx(1 / (t.p_out.shape[0] + 1))
    assert pc.step_metrics(1)["recovery/d_model/max"] == pytest.approx(frac)


def test_bf16_base_storage_still_starts_at_hpr():
    m = tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # representable in bf16
    plan = make_plan(m, 0.5, importance.random(m, 0))
    pc = Projected(m, plan, base_dtype=torch.bfloat16)
    pc.before_step()
    hpr = prune(m, plan)
    ids = calib(1)[0]
    assert torch.equal(pc.model(input_ids=ids).logits, hpr(input_ids=ids).logits)
    assert all(t.base.dtype == torch.bfloat16 for t in pc.tensors.values())


# -- the closed-form push (`ProjectedTensor.push`) -----------------------------------------------

TENSOR_CASES = [  # (keep_out?, keep_in?, trainable out, trainable in): every layout the map produces
    (True, True, True, True), (True, True, False, True), (True, True, True, False),
    (True, False, True, False), (False, True, False, True),
]


def _tensor(case, residual: bool, cache_seed: int = 0, dtype=torch.float64, base_dtype=torch.float64):
    from pcbench.compress.projected import ProjectedTensor

    has_out, has_in, t_out, t_in = case
    g = torch.Generator().manual_seed(cache_seed)
    w = torch.randn(12, 7, generator=g, dtype=torch.float64)
    keep = [torch.tensor([0, 3, 4, 8, 11]) if has_out else None, torch.tensor([1, 2, 6]) if has_in else None]
    t = ProjectedTensor(w, keep, (t_out, t_in), residual, base_dtype=base_dtype).to(dtype)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return t


@pytest.mark.parametrize("case", TENSOR_CASES)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("cache", [True, False])
def test_push_equals_autograd_and_accumulates(case, residual, cache):
    """float64: push(G) after step_weight == backward(G) through materialise, added to existing
    .grad (twice, as over two pushes), for every side layout, fixed selections and residual."""
    t, ref = _tensor(case, residual), _tensor(case, residual)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.small_shape, generator=g, dtype=torch.float64) for _ in range(2)]
    for p, q in zip(t.parameters(), ref.parameters()):
        p.grad = torch.full_like(p, 0.5)
        q.grad = torch.full_like(q, 0.5)
    for G in grads:
        w = t.step_weight(cache=cache)
        torch.testing.assert_close(w, ref.materialise().detach(), rtol=0, atol=0)
        t.push(G.clone())
        ref.materialise().backward(G.clone())
        assert t._mid is None  # the step's intermediate is dropped by the push
    params = dict(t.named_parameters())
    assert set(params) == {n for n, _ in ref.named_parameters()} and params
    for n, q in ref.named_parameters():
        torch.testing.assert_close(params[n].grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)
    if case[2] and case[3]:
        assert t.cache_numel() > 0
    # Without a preceding step_weight (no cache) the push recomputes and still agrees.
    for p in t.parameters():
        p.grad = None
    t.push(grads[0])
    for q in ref.parameters():
        q.grad = None
    ref.materialise().backward(grads[0])
    for n, q in ref.named_parameters():
        torch.testing.assert_close(params[n].grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)


@pytest.mark.parametrize("case", TENSOR_CASES)
@pytest.mark.parametrize("cache", [True, False])
def test_push_and_materialise_flops_are_what_runs(case, cache):
    """`flops()` and `push_flops()` equal the matmul FLOPs torch counts for step_weight + push."""
    from torch.utils.flop_counter import FlopCounterMode

    t = _tensor(case, residual=True)
    G = torch.randn(t.small_shape, dtype=torch.float64)
    with FlopCounterMode(display=False) as fc:
        t.step_weight(cache=True)
    assert fc.get_total_flops() == t.flops()
    t._mid = t._mid if cache else None
    with FlopCounterMode(display=False) as fc:
        t.push(G)
    assert fc.get_total_flops() == t.push_flops(cache)


def test_fixed_flops_per_step_is_the_floor():
    """Per step: materialise once plus the push; one-sided tensors cost two materialisations,
    two-sided ones less than the old materialise + recompute + backward (4x materialise)."""
    m = tiny("llama-tiny")
    plan = make_plan(m, 0.5, importance.random(m, 0))
    pc, nocache = Projected(m, plan), Projected(m, plan, cache=False)
    mat = sum(t.flops() for t in pc.tensors.values())
    assert pc.fixed_flops_per_step() == sum(t.flops() + t.push_flops() for t in pc.tensors.values())
    for t in pc.tensors.values():
        two = t.p_out is not None and t.p_in is not None
        assert t.push_flops() == t.flops() if not two else t.push_flops() < 2 * t.flops()
    assert pc.fixed_flops_per_step() < nocache.fixed_flops_per_step() < 4 * mat
    two_sided = [t for t in pc.tensors.values() if t.p_out is not None and t.p_in is not None]
    assert two_sided and pc.step_cache_bytes() == 4 * sum(t.cache_numel() for t in two_sided)
    assert nocache.step_cache_bytes() == 0


class _RecomputePC(Projected):
    """The previous push: recompute W_c with autograd and backward G through it."""

    def after_backward(self) -> None:
        small = dict(self.model.named_parameters())
        for key, t in self.tensors.items():
            w = small[self.names[key]]
            if w.grad is not None:
                with torch.enable_grad():
                    t.materialise(w.device).backward(w.grad)
                w.grad = None


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("sides", ["in", "out", "both"])
def test_closed_form_push_trains_bitwise_like_the_autograd_recompute(family, sides):
    """fp32, real optimiser steps with micro-batches: the closed-form push reproduces the
    autograd-recompute path bit for bit (same products in the same order), so the losses of
    studies trained before it are unchanged."""
    from pcbench.train.loop import Stepper

    m = MODELS[family]()
    plan = make_plan(m, 0.5, importance.random(m, 1))
    batch = calib(1, rows=4, seq=10, seed=3)[0]
    runs = []
    for cls in (Projected, _RecomputePC):
        pc = cls(m, plan, sides=sides, residual=True)
        if sides == "in":
            assert any(t.idx_out is not None for t in pc.tensors.values())  # fixed selections in play
        if sides == "out":
            assert any(t.idx_in is not None for t in pc.tensors.values())
        opt = torch.optim.AdamW(pc.param_groups(0.1), lr=1e-2)
        stepper = Stepper(pc, pc.model, opt, None, micro=2)
        losses = [stepper(batch, i) for i in range(3)]
        runs.append((losses, [p.detach().clone() for p in pc.parameters()]))
    (l1, p1), (l2, p2) = runs
    assert l1 == l2 and l1[-1][0] < l1[0][0]
    assert len(p1) == len(p2) and all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_bf16_base_push_matches_autograd_and_is_close_to_fp32():
    """bf16 base, fp32 projections: the push equals autograd through the same bf16-stored P.W.P,
    and is close to the fp32-base gradients (the base is rounded to bf16, nothing else)."""
    torch.manual_seed(0)
    m = tiny()
    plan = make_plan(m, 0.5, importance.random(m, 0))
    ids = calib(1)[0]
    got = {}
    for dtype in (torch.bfloat16, torch.float32):
        pc = Projected(m, plan, base_dtype=dtype)
        _perturb(pc, 2)
        ref = copy.deepcopy(pc)
        pc.before_step()
        pc.model(input_ids=ids).logits.float().pow(2).mean().backward()
        pc.after_backward()
        ref.reference_logits(ids).float().pow(2).mean().backward()
        g, want = _grads(pc), _grads(ref)
        for k in want:
            torch.testing.assert_close(g[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
        assert all(p.grad.dtype == torch.float32 for p in pc.tensors.parameters())
        got[dtype] = g
    rel = {k: float((got[torch.bfloat16][k] - v).norm() / v.norm()) for k, v in got[torch.float32].items()}
    assert max(rel.values()) < 2e-2, rel  # bf16 rounding of W (2^-9 relative) and nothing more
    assert max(rel.values()) > 0  # the bf16 base really is rounded


# -- in-place materialisation and order="flops" ---------------------------------------------------


def test_before_step_writes_in_place_bitwise_and_falls_back_to_a_copy():
    """fp32: before_step fills the small weights' own storage with exactly step_weight()'s W_c; an
    `out` of another dtype gets a rounded copy; a bad order is refused."""
    from pcbench.compress.projected import ProjectedTensor

    m = tiny()
    plan = make_plan(m, 0.5, importance.random(m, 0))
    pc = Projected(m, plan)
    _perturb(pc, 3)
    small = dict(pc.model.named_parameters())
    ptrs = {k: small[pc.names[k]].data_ptr() for k in pc.tensors}
    pc.before_step()
    for k, t in pc.tensors.items():
        w = small[pc.names[k]]
        assert w.data_ptr() == ptrs[k] and torch.equal(w, t.step_weight()), k
    t = pc.tensors["model__layers__0__mlp__up_proj__weight"]
    buf = torch.empty(t.small_shape, dtype=torch.bfloat16)
    assert t.step_weight(out=buf) is buf and torch.equal(buf, t.step_weight().to(torch.bfloat16))
    with pytest.raises(ValueError, match="order"):
        Projected(m, plan, order="fastest")
    with pytest.raises(ValueError, match="order"):
        ProjectedTensor(torch.zeros(4, 4), [torch.tensor([0, 1]), None], (True, False), True, order="x")


FLOPS_SHAPES = [(32, 8, 20, 5), (8, 32, 5, 20), (12, 7, 5, 3)]  # gate/up-, down-like (bench cell / 32), other


def _shaped(shape, order: str, residual: bool):
    from pcbench.compress.projected import ProjectedTensor

    n_out, n_in, k_out, k_in = shape
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    keep = [torch.randperm(n_out, generator=g)[:k_out].sort().values,
            torch.randperm(n_in, generator=g)[:k_in].sort().values]
    t = ProjectedTensor(w, keep, (True, True), residual, base_dtype=torch.float64, order=order).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return t


@pytest.mark.parametrize("shape", FLOPS_SHAPES)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("cache", [True, False])
def test_flops_order_push_equals_autograd_with_fewer_flops(shape, residual, cache):
    """float64: order="flops" materialises P_out W P_in + R and accumulates the gradients autograd
    gives through that product (twice, onto existing .grad); the FLOPs torch counts are the ones
    it states; with the cache never more than the autograd order's, fewer on the bench cell's MLP
    shapes, with no larger cache."""
    from torch.utils.flop_counter import FlopCounterMode

    t, auto = _shaped(shape, "flops", residual), _shaped(shape, "autograd", residual)
    if shape != FLOPS_SHAPES[-1]:
        assert t.route() != auto.route()
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in t.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for p in list(t.parameters()) + list(leaves.values()):
        p.grad = torch.full_like(p, 0.5)
    for _ in range(2):
        G = torch.randn(t.small_shape, generator=g, dtype=torch.float64)
        with FlopCounterMode(display=False) as fc:
            w = t.step_weight(cache=cache)
            if not cache:
                assert t._mid is None
            t.push(G)
        assert fc.get_total_flops() == t.flops() + t.push_flops(cache)
        ref = leaves["p_out"] @ t.base @ leaves["p_in"]
        if residual:
            ref = ref + leaves["residual"]
        torch.testing.assert_close(w, ref.detach(), rtol=1e-12, atol=1e-13)
        ref.backward(G)
    for n, p in t.named_parameters():
        torch.testing.assert_close(p.grad, leaves[n].grad, rtol=1e-12, atol=1e-13, msg=n)
    total, total_auto = t.flops() + t.push_flops(), auto.flops() + auto.push_flops()  # with the cache
    assert total <= total_auto and (total < total_auto if shape != FLOPS_SHAPES[-1] else True)
    assert t.cache_numel() <= auto.cache_numel()


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("sides,residual", VARIANTS)
def test_flops_order_cost_free_gradients_equal_autograd(family, sides, residual):
    """As test_cost_free_gradients_equal_autograd_through_projections, with order="flops"."""
    torch.manual_seed(0)
    m = MODELS[family]().double()
    plan = make_plan(m, 0.5, importance.random(m, 1))
    pc = Projected(m, plan, sides=sides, residual=residual, order="flops").double()
    _perturb(pc, 2)
    ref = copy.deepcopy(pc)
    got, want = cost_free_and_autograd_grads(pc, ref, calib(n=3, rows=2, seq=9, seed=5))
    assert set(got) == set(want) and len(got) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11, msg=k)
