"""Projected Compression: W_c = P_out . W . P_in (+ R) over a frozen base, trained cost-free.

Generic over the compression map: every base tensor with at least one compressed dim and two
dims becomes a `ProjectedTensor`; vectors (norms, biases) are sliced and trained directly in the
small network. Per optimiser step the training loop calls `before_step` (materialise every W_c
into the small network, no grad), runs all micro-batches through the small network (gradients
accumulate in its weights), then `after_backward` pushes each weight gradient G back into that
tensor's P_out, P_in and R with one recomputed backward per tensor (memory stays bounded by one
tensor). Tokens never pass through P.W.P, so the per-token cost equals hard pruning's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from pcbench.compress.axes import axis_kind, tensor_axes
from pcbench.compress.plan import Plan
from pcbench.compress.prune import prune
from pcbench.trainable import Direct, decay_groups


def one_hot_rows(keep: torch.Tensor, full: int) -> torch.Tensor:
    """[k, full] selection: row i picks column keep[i] (so P @ W == W[keep])."""
    p = torch.zeros(len(keep), full)
    p[torch.arange(len(keep)), keep] = 1.0
    return p


class ProjectedTensor(nn.Module):
    """One compressed tensor: frozen base `W` [n_out, n_in], trainable `P_out` [k_out, n_out] and/or
    `P_in` [n_in, k_in] (one-hot at init), optional residual `R` [k_out, k_in] (zero at init). A
    compressed dim without a trainable projection is a fixed selection of the kept indices."""

    def __init__(self, weight: torch.Tensor, keep: list[Optional[torch.Tensor]], trainable: tuple[bool, bool],
                 residual: bool, base_dtype: torch.dtype = torch.float32):
        super().__init__()
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

    def _param_dtype(self) -> torch.dtype:
        for p in (self.p_out, self.p_in, self.residual):
            if p is not None:
                return p.dtype
        return torch.float32

    def materialise(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """W_c on `device` (default: where the projections live). Differentiable in P and R."""
        dev = device or (self.p_out if self.p_out is not None else self.p_in if self.p_in is not None
                         else self.base).device
        w = self.base.to(device=dev, dtype=self._param_dtype(), non_blocking=True)
        if self.idx_out is not None:
            w = w.index_select(0, self.idx_out.to(dev))
        if self.idx_in is not None:
            w = w.index_select(1, self.idx_in.to(dev))
        if self.p_out is not None and self.p_in is not None:
            k_out, k_in = self.small_shape
            n_out, n_in = w.shape
            # Multiply in the cheaper order: (P_out W) P_in vs P_out (W P_in).
            if k_out * n_out * n_in + k_out * n_in * k_in <= n_out * n_in * k_in + k_out * n_out * k_in:
                w = (self.p_out @ w) @ self.p_in
            else:
                w = self.p_out @ (w @ self.p_in)
        elif self.p_out is not None:
            w = self.p_out @ w
        elif self.p_in is not None:
            w = w @ self.p_in
        if self.residual is not None:
            w = w + self.residual
        return w

    def flops(self) -> int:
        """FLOPs to materialise once (the backward to P costs about twice that)."""
        n_out, n_in = self.base.shape
        k_out, k_in = self.small_shape
        f = 0
        if self.p_out is not None and self.p_in is not None:
            f = 2 * min(k_out * n_out * n_in + k_out * n_in * k_in, n_out * n_in * k_in + k_out * n_out * k_in)
        elif self.p_out is not None:
            f = 2 * k_out * n_out * (n_in if self.idx_in is None else k_in)
        elif self.p_in is not None:
            f = 2 * (n_out if self.idx_out is None else k_out) * n_in * k_in
        return f

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


def _key(name: str) -> str:
    return name.replace(".", "__")


class Projected(Direct):
    """Projected Compression of `base` under `plan`; `self.model` is the small stock network."""

    def __init__(self, base: PreTrainedModel, plan: Plan, sides: str = "both", residual: bool = True,
                 base_dtype: torch.dtype = torch.float32, decay_projections: bool = True):
        if sides not in ("in", "out", "both"):
            raise ValueError(f"sides must be in, out or both, got {sides!r}")
        super().__init__(prune(base, plan))
        self.plan = plan
        self.sides = sides
        self.decay_projections = decay_projections
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
            t = ProjectedTensor(p.detach(), keep, trainable, residual, base_dtype)
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
        small = dict(self.model.named_parameters())
        for key, t in self.tensors.items():
            w = small[self.names[key]]
            w.copy_(t.materialise(w.device))
            w.grad = None

    def after_backward(self) -> None:
        small = dict(self.model.named_parameters())
        for key, t in self.tensors.items():
            w = small[self.names[key]]
            if w.grad is None:
                continue
            with torch.enable_grad():
                t.materialise(w.device).backward(w.grad.to(t._param_dtype()))
            w.grad = None

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
        """Materialise (1x) + recompute (1x) + backward to P (2x) per tensor."""
        return 4 * sum(t.flops() for t in self.tensors.values())

    @torch.no_grad()
    def export(self) -> PreTrainedModel:
        self.before_step()
        return self.model

    # -- slow reference (tests and the naive benchmark only) -----------------------------------
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits with every W_c computed inside the forward (autograd through P.W.P per batch)."""
        weights = {self.names[k]: t.materialise() for k, t in self.tensors.items()}
        return torch.func.functional_call(self.model, weights, (input_ids,), strict=False).logits

