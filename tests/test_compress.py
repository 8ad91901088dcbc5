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
from pcbench.config import ModelSpec
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
    micro = calib(n=3, rows=2, seq=9, seed=5)

    def loss_of(logits, ids):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    pc.before_step()
    for ids in micro:
        (loss_of(pc.model(input_ids=ids).logits, ids) / len(micro)).backward()
    pc.after_backward()
    for ids in micro:
        (loss_of(ref.reference_logits(ids), ids) / len(micro)).backward()
    got, want = _grads(pc), _grads(ref)
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
