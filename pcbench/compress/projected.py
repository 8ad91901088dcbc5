"""Projected Compression: W_c = P_out . W . P_in (+ R) over a frozen base, trained cost-free.

Generic over the compression map: every base tensor with at least one compressed dim and two
dims becomes a `ProjectedTensor`; vectors (norms, biases) are sliced and trained directly in the
small network. Per optimiser step the training loop calls `before_step` (materialise every W_c
into the small network, no grad), runs all micro-batches through the small network (gradients
accumulate in its weights), then `after_backward` pushes each weight gradient G back into that
tensor's P_out, P_in and R in closed form (dP_out = G (W P_in)^T, dP_in = (P_out W)^T G, dR = G),
the same products autograd's backward through P.W.P would run, accumulated into `.grad` the same
way. Tokens never pass through P.W.P, so the per-token cost equals hard pruning's.

Per step and tensor that is the floor: one materialisation, then one large product per trained
projection. A two-sided tensor reuses the intermediate its materialisation computed (P_out W or
W P_in, whichever order is cheaper), held from `before_step` to `after_backward` (`cache=True`).
Extra memory: k_out x n_in or n_out x k_in elements per two-sided tensor in the parameters' dtype,
never more than its base and at 50% half of it (`step_cache_bytes`; 7.5 MiB fp32 on the
step-cost benchmark's Llama cell). Without the cache the push recomputes it (one product more).
`before_step` writes the last product (and R) straight into the small weight (no W_c temporary).

`order` picks each two-sided tensor's association (`ProjectedTensor.route`): "autograd" (default)
runs the products autograd's backward through the cheaper materialisation order would, so fp32
training is bitwise that of the autograd-recompute path; "flops" picks, per tensor shape, the
materialisation and push products with the fewest FLOPs in all, with the cache (the same gradients up to float
rounding, so fp32 losses differ in the last bits; same cache size: the materialisation's own
intermediate, the push computes the other one when it needs it).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from pcbench.compress.axes import axis_kind, tensor_axes
from pcbench.compress.plan import Plan
from pcbench.compress.prune import prune
from pcbench.compress.trainable import Direct, decay_groups


ORDERS = ("autograd", "flops")
# The fixed part's matmul precision (`compress.fixed_precision`): fp32 (exact fp32 products, TF32 off),
# tf32 (fp32 tensors, TF32 tensor-core products on CUDA; on CPU there is no TF32: the same as fp32),
# bf16 (operands rounded to bf16, products accumulated and returned in fp32: `torch.mm(..., out_dtype=
# torch.float32)` on CUDA, the same rounding emulated by fp32 products of the rounded operands on CPU).
# P, R, their gradients and W_c stay fp32 in all three.
PRECISIONS = ("fp32", "tf32", "bf16")


def resolve_fixed_precision(value: str, device) -> str:
    """`compress.fixed_precision` on `device`: `auto` is fp32 on CPU (the committed CPU studies stay
    bitwise) and tf32 on CUDA (see `pcbench.spec.config.CompressSpec.fixed_precision`)."""
    if value != "auto":
        if value not in PRECISIONS:
            raise ValueError(f"fixed precision must be auto or one of {', '.join(PRECISIONS)}, got {value!r}")
        return value
    return "tf32" if torch.device(device).type == "cuda" else "fp32"


@contextlib.contextmanager
def _tf32(on: bool):
    """TF32 matmuls on CUDA within (restored after); nothing on CPU, which has none."""
    if not on:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` with bf16 operands and an fp32 result accumulated in fp32."""
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if a.is_cuda:
        try:
            return torch.mm(a16, b16, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # an older torch: bf16 result (autocast's rounding)
            return torch.mm(a16, b16).float()
    return torch.mm(a16.float(), b16.float())  # CPU: the operands' rounding, fp32 products
# A two-sided tensor's route: (W_c from "A" = P_out W, i.e. A P_in, or from "B" = W P_in, i.e. P_out B;
# dP_out as G B^T ("B") or (G P_in^T) W^T ("C"); dP_in as A^T G ("A") or W^T (P_out^T G) ("D")).
ROUTES = tuple((wc, dpo, dpi) for wc in "AB" for dpo in "BC" for dpi in "AD")


def one_hot_rows(keep: torch.Tensor, full: int) -> torch.Tensor:
    """[k, full] selection: row i picks column keep[i] (so P @ W == W[keep])."""
    p = torch.zeros(len(keep), full)
    p[torch.arange(len(keep)), keep] = 1.0
    return p


class ProjectedTensor(nn.Module):
    """One compressed tensor: frozen base `W` [n_out, n_in], trainable `P_out` [k_out, n_out] and/or
    `P_in` [n_in, k_in] (one-hot at init), optional residual `R` [k_out, k_in] (zero at init). A
    compressed dim without a trainable projection is a fixed selection of the kept indices."""

    order = "autograd"  # class defaults: views built without __init__ (parallel's row views)
    precision = "fp32"

    def __init__(self, weight: torch.Tensor, keep: list[Optional[torch.Tensor]], trainable: tuple[bool, bool],
                 residual: bool, base_dtype: torch.dtype = torch.float32, order: str = "autograd",
                 precision: str = "fp32"):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.order = order
        self.precision = precision
        if weight.ndim != 2:
            raise ValueError(f"ProjectedTensor needs a matrix, got shape {tuple(weight.shape)}")
        w = weight.detach()
        self.register_buffer("base", w if w.dtype == base_dtype else w.to(base_dtype), persistent=False)
        n_out, n_in = w.shape
        self.p_out = self.p_in = self.residual = None
        self.register_buffer("idx_out", None)
        self.register_buffer("idx_in", None)
        if keep[0] is not None:
            if trainable[0]:
                self.p_out = nn.Parameter(one_hot_rows(keep[0], n_out).to(w.device))
            else:
                self.idx_out = keep[0].to(w.device)
        if keep[1] is not None:
            if trainable[1]:
                self.p_in = nn.Parameter(one_hot_rows(keep[1], n_in).t().contiguous().to(w.device))
            else:
                self.idx_in = keep[1].to(w.device)
        # Kept indices stay available for the recovery metric.
        self.register_buffer("keep_out", None if keep[0] is None else keep[0].to(w.device), persistent=False)
        self.register_buffer("keep_in", None if keep[1] is None else keep[1].to(w.device), persistent=False)
        k_out = n_out if keep[0] is None else len(keep[0])
        k_in = n_in if keep[1] is None else len(keep[1])
        self.small_shape = (k_out, k_in)
        if residual:
            self.residual = nn.Parameter(torch.zeros(k_out, k_in, device=w.device))
        self._mid: Optional[torch.Tensor] = None  # `step_weight`'s intermediate, until `push`

    def _param_dtype(self) -> torch.dtype:
        for p in (self.p_out, self.p_in, self.residual):
            if p is not None:
                return p.dtype
        return torch.float32

    def _device(self) -> torch.device:
        return (self.p_out if self.p_out is not None else self.p_in if self.p_in is not None else self.base).device

    def operand_dtype(self) -> torch.dtype:
        """The dtype the base enters the products in: the parameters' (bf16 precision: bf16, the
        operand the products round it to anyway)."""
        return torch.bfloat16 if self.precision == "bf16" else self._param_dtype()

    def precision_scope(self) -> contextlib.AbstractContextManager:
        """The context the fixed part's products run in (tf32: TF32 matmuls on CUDA)."""
        return _tf32(self.precision == "tf32")

    def _base_on(self, dev: torch.device) -> torch.Tensor:
        """The base in `operand_dtype` on `dev`, with the fixed selections applied."""
        w = self.base.to(device=dev, dtype=self.operand_dtype(), non_blocking=True)
        if self.idx_out is not None:
            w = w.index_select(0, self.idx_out.to(dev))
        if self.idx_in is not None:
            w = w.index_select(1, self.idx_in.to(dev))
        return w

    def _out_first(self) -> bool:
        """Two-sided: multiply (P_out W) P_in (True) or P_out (W P_in), whichever is cheaper."""
        k_out, k_in = self.small_shape
        n_out, n_in = self.base.shape
        return k_out * n_out * n_in + k_out * n_in * k_in <= n_out * n_in * k_in + k_out * n_out * k_in

    def _route_macs(self, route: tuple[str, str, str]) -> tuple[int, int]:
        """(multiply-adds of the materialisation, of the push with the cache) along `route`."""
        k_out, k_in = self.small_shape
        n_out, n_in = self.base.shape
        a, b = k_out * n_out * n_in, n_out * n_in * k_in  # A = P_out W, B = W P_in
        wc, dpo, dpi = route
        mat = a + k_out * n_in * k_in if wc == "A" else b + k_out * n_out * k_in
        push = k_out * k_in * n_out if dpo == "B" else k_out * k_in * n_in + k_out * n_in * n_out
        push += n_in * k_out * k_in if dpi == "A" else n_out * k_out * k_in + n_in * n_out * k_in
        push += (a if dpi == "A" and wc != "A" else 0) + (b if dpo == "B" and wc != "B" else 0)
        return mat, push

    def route(self) -> tuple[str, str, str]:
        """Two-sided: the products of materialise and push (see `ROUTES`). "autograd": those of the
        backward through the cheaper materialisation; "flops": the fewest in all (ties: autograd's)."""
        auto = ("A", "C", "A") if self._out_first() else ("B", "B", "D")
        if self.order == "autograd":
            return auto
        return min(ROUTES, key=lambda r: (sum(self._route_macs(r)), r != auto))

    def _uses_mid(self) -> bool:
        """Two-sided: does the push use the materialisation's intermediate (then it is cached)?"""
        wc, dpo, dpi = self.route()
        return (dpi if wc == "A" else dpo) == wc

    def materialise(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """W_c on `device` (default: where the projections live). Differentiable in P and R."""
        return self._materialise(device or self._device())[0]

    def _mm(self, a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One product of the fixed part at `precision` (fp32 and tf32: `_mm`, into `out` when it fits)."""
        if self.precision == "bf16":
            return _bf16_mm(a, b)
        return _mm(a, b, out)

    def _materialise(self, dev: torch.device, out: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W_c, the two-sided intermediate P_out W or W P_in, else None); with `out` (no autograd),
        W_c is written into it (the last product straight in when dtype, device and layout allow)."""
        with self.precision_scope():
            return self._materialise_at(dev, out)

    def _materialise_at(self, dev: torch.device, out: Optional[torch.Tensor]
                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        w, mid = self._base_on(dev), None
        mm = self._mm
        if self.p_out is not None and self.p_in is not None:
            if self.route()[0] == "A":
                mid = mm(self.p_out, w)
                w = mm(mid, self.p_in, out)
            else:
                mid = mm(w, self.p_in)
                w = mm(self.p_out, mid, out)
        elif self.p_out is not None:
            w = mm(self.p_out, w, out)
        elif self.p_in is not None:
            w = mm(w, self.p_in, out)
        elif w.dtype != self._param_dtype():  # selections only (bf16 precision read the base in bf16)
            w = w.to(self._param_dtype())
        if self.residual is not None:
            w = w.add_(self.residual) if w is out else w + self.residual
        if out is not None and w is not out:
            w = out.copy_(w)
        return w, mid

    @torch.no_grad()
    def step_weight(self, device: Optional[torch.device] = None, cache: bool = True,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """W_c without autograd (into `out` if given); with `cache`, keep the two-sided
        intermediate for `push` when the push uses it."""
        w, mid = self._materialise(device or self._device(), out)
        self._mid = mid if cache and mid is not None and self._uses_mid() else None
        return w

    @torch.no_grad()
    def push(self, grad: torch.Tensor) -> None:
        """Accumulate dL/dP_out, dL/dP_in, dL/dR for dL/dW_c = `grad` into their `.grad`, along
        `route()` ("autograd": the products of autograd's backward through `materialise`, same
        order); uses and drops the intermediate `step_weight(cache=True)` kept, else recomputes it.
        The gradient that uses the materialisation's intermediate goes first, so at most one of
        P_out W and W P_in is alive at a time."""
        with self.precision_scope():
            self._push(grad)

    def _push(self, grad: torch.Tensor) -> None:
        g = grad.to(self._param_dtype())
        mm = self._mm
        mid, self._mid = self._mid, None
        if self.p_out is not None or self.p_in is not None:
            w = self._base_on(g.device)
            if self.p_out is not None and self.p_in is not None:
                wc, dpo, dpi = self.route()
                p_out, p_in = self.p_out, self.p_in

                def d_in(a):
                    if dpi == "A":
                        _accumulate(p_in, mm((a if a is not None else mm(p_out, w)).t(), g))
                    else:
                        _accumulate(p_in, mm(w.t(), mm(p_out.t(), g)))

                def d_out(b):
                    if dpo == "B":
                        _accumulate(p_out, mm(g, (b if b is not None else mm(w, p_in)).t()))
                    else:
                        _accumulate(p_out, mm(mm(g, p_in.t()), w.t()))

                if wc == "A":  # W_c = A P_in
                    d_in(mid)
                    mid = None
                    d_out(None)
                else:  # W_c = P_out B
                    d_out(mid)
                    mid = None
                    d_in(None)
            elif self.p_out is not None:
                _accumulate(self.p_out, mm(g, w.t()))
            else:
                _accumulate(self.p_in, mm(w.t(), g))
        if self.residual is not None:
            _accumulate(self.residual, g)

    def flops(self) -> int:
        """FLOPs to materialise once."""
        n_out, n_in = self.base.shape
        k_out, k_in = self.small_shape
        f = 0
        if self.p_out is not None and self.p_in is not None:
            f = 2 * self._route_macs(self.route())[0]
        elif self.p_out is not None:
            f = 2 * k_out * n_out * (n_in if self.idx_in is None else k_in)
        elif self.p_in is not None:
            f = 2 * (n_out if self.idx_out is None else k_out) * n_in * k_in
        return f

    def push_flops(self, cache: bool = True) -> int:
        """FLOPs of `push`: one-sided, one product the size of the materialisation; two-sided, the
        gradient products of `route()` (plus the intermediate the materialisation did not compute,
        and without the cache the one it did). Residual-only gradients cost nothing."""
        if self.p_out is None or self.p_in is None:
            return self.flops()
        n_out, n_in = self.base.shape
        k_out, k_in = self.small_shape
        route = self.route()
        f = self._route_macs(route)[1]
        if not cache and self._uses_mid():
            f += k_out * n_out * n_in if route[0] == "A" else n_out * n_in * k_in
        return 2 * f

    def cache_numel(self) -> int:
        """Elements `step_weight(cache=True)` holds until `push`: the two-sided intermediate."""
        if self.p_out is None or self.p_in is None or not self._uses_mid():
            return 0
        n_out, n_in = self.base.shape
        k_out, k_in = self.small_shape
        return k_out * n_in if self.route()[0] == "A" else n_out * k_in

    @torch.no_grad()
    def dropped_mass(self) -> dict[str, float]:
        """Share of each projection's squared mass on base indices that hard pruning dropped."""
        out = {}
        for side, p, keep, dim in (("out", self.p_out, self.keep_out, 1), ("in", self.p_in, self.keep_in, 0)):
            if p is None:
                continue
            sq = p.float().pow(2)
            total = sq.sum()
            kept = sq.index_select(dim, keep).sum()
            out[side] = float((total - kept) / total) if total > 0 else 0.0
        return out


def _mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """`a @ b`, written into `out` when it fits (same dtype, device, shape, contiguous): the
    same kernel, so bitwise the same result, without a temporary and a copy."""
    if (out is not None and out.dtype == a.dtype == b.dtype and out.device == a.device
            and out.shape == (a.shape[0], b.shape[1]) and out.is_contiguous()):
        return torch.mm(a, b, out=out)
    return a @ b


def _accumulate(p: nn.Parameter, grad: torch.Tensor) -> None:
    """`p.grad += grad` (or `= grad` when none), as autograd accumulates."""
    if p.grad is None:
        p.grad = grad
    else:
        p.grad.add_(grad)


def _key(name: str) -> str:
    return name.replace(".", "__")


class Projected(Direct):
    """Projected Compression of `base` under `plan`; `self.model` is the small stock network.
    `cache`: keep each two-sided tensor's intermediate (P_out W or W P_in) from `before_step` to
    `after_backward`, one matmul less per such tensor and step for `step_cache_bytes()` of memory.
    `order`: each two-sided tensor's association ("autograd" or "flops", see the module docstring).
    `precision`: the fixed part's matmuls (`PRECISIONS`: fp32, tf32 or bf16 operands with fp32 results)."""

    def __init__(self, base: PreTrainedModel, plan: Plan, sides: str = "both", residual: bool = True,
                 base_dtype: torch.dtype = torch.float32, decay_projections: bool = True, cache: bool = True,
                 order: str = "autograd", precision: str = "fp32"):
        if sides not in ("in", "out", "both"):
            raise ValueError(f"sides must be in, out or both, got {sides!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        super().__init__(prune(base, plan))
        self.plan = plan
        self.sides = sides
        self.decay_projections = decay_projections
        self.cache = cache
        self.order = order
        self.tensors = nn.ModuleDict()
        self.names: dict[str, str] = {}  # module key -> parameter name
        small = dict(self.model.named_parameters())
        self.axes = tensor_axes(base)
        for name, p in base.named_parameters():
            ax = self.axes[name]
            if p.ndim != 2 or not ax.compressed:
                continue  # trained directly in the small network (norms, biases, uncompressed)
            both = all(a is not None for a in ax.dims)
            trainable = (
                ax.dims[0] is not None and (not both or sides in ("out", "both")),
                ax.dims[1] is not None and (not both or sides in ("in", "both")),
            )
            keep = [None if a is None else plan.keep[a] for a in ax.dims]
            t = ProjectedTensor(p.detach(), keep, trainable, residual, base_dtype, order, precision)
            self.tensors[_key(name)] = t
            self.names[_key(name)] = name
            small[name].requires_grad_(True)  # receives gradients, never stepped directly

    def place(self, device: torch.device, base_device: Optional[torch.device] = None) -> "Projected":
        """Move the small network and projections to `device`, the frozen bases to `base_device`
        (default: `device`), tensor by tensor so the base is never duplicated on `device`."""
        base_device = base_device or device
        for t in self.tensors.values():
            t.base = t.base.to(base_device)
            for name in ("idx_out", "idx_in", "keep_out", "keep_in"):
                if getattr(t, name) is not None:
                    setattr(t, name, getattr(t, name).to(device))
            for q in t.parameters(recurse=False):
                q.data = q.data.to(device)
        self.model.to(device)
        return self

    # -- what the optimiser sees ---------------------------------------------------------------
    def _direct_params(self):
        projected = set(self.names.values())
        return [(n, p) for n, p in self.model.named_parameters() if n not in projected]

    def param_groups(self, weight_decay: float, decay_norms: bool = False) -> list[dict]:
        proj = [(n, p) for n, p in self.tensors.named_parameters()]
        decay_proj = weight_decay if self.decay_projections else 0.0
        groups = decay_groups(self._direct_params(), weight_decay, decay_norms=decay_norms)
        if proj:
            groups.append({"params": [p for _, p in proj], "weight_decay": decay_proj})
        return groups

    # -- the cost-free step --------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Materialise every W_c into the small network's weight in place (keeping intermediates
        if `cache`)."""
        small = dict(self.model.named_parameters())
        for key, t in self.tensors.items():
            w = small[self.names[key]]
            t.step_weight(w.device, cache=self.cache, out=w)
            w.grad = None

    @torch.no_grad()
    def after_backward(self) -> None:
        """Push each small weight's gradient into its tensor's P/R `.grad` (accumulating), then
        drop the small weight's gradient and the step's cached intermediates."""
        small = dict(self.model.named_parameters())
        for key, t in self.tensors.items():
            w = small[self.names[key]]
            if w.grad is None:
                t._mid = None
                continue
            t.push(w.grad)
            w.grad = None

    def step_cache_bytes(self) -> int:
        """Memory `cache` holds during a step: every two-sided tensor's intermediate."""
        if not self.cache:
            return 0
        return sum(t.cache_numel() * torch.empty((), dtype=t._param_dtype()).element_size()
                   for t in self.tensors.values())

    # -- reporting -----------------------------------------------------------------------------
    def step_metrics(self, step: int) -> dict:
        """Mean and max share of P mass on dropped indices, per axis kind ("recovery")."""
        by_kind: dict[str, list[float]] = {}
        for key, t in self.tensors.items():
            ax = self.axes[self.names[key]]
            for side, frac in t.dropped_mass().items():
                dim = 0 if side == "out" else 1
                by_kind.setdefault(axis_kind(ax.dims[dim]), []).append(frac)
        out = {}
        for kind, v in sorted(by_kind.items()):
            out[f"recovery/{kind}/mean"] = sum(v) / len(v)
            out[f"recovery/{kind}/max"] = max(v)
        return out

    def recovery_detail(self) -> dict[str, dict[str, float]]:
        """Per tensor and side, the share of P mass on dropped indices."""
        return {self.names[k]: t.dropped_mass() for k, t in self.tensors.items()}

    def fixed_flops_per_step(self) -> int:
        """Materialise once + push (`ProjectedTensor.push_flops`) per tensor."""
        return sum(t.flops() + t.push_flops(self.cache) for t in self.tensors.values())

    def export(self) -> PreTrainedModel:
        """The small network with every W_c materialised (no intermediates kept)."""
        self.before_step()
        for t in self.tensors.values():
            t._mid = None
        return self.model

    # -- slow reference (tests and the naive benchmark only) -----------------------------------
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits with every W_c computed inside the forward (autograd through P.W.P per batch)."""
        weights = {self.names[k]: t.materialise() for k, t in self.tensors.items()}
        return torch.func.functional_call(self.model, weights, (input_ids,), strict=False).logits

