"""`pc`: cost-free Projected Compression (`compress.projected.Projected`): W_c materialised once per
optimiser step into the small network, its gradient pushed into P_out, P_in and R in closed form."""

from __future__ import annotations

import torch

from pcbench.compress.projected import Projected, resolve_fixed_precision
from pcbench.spec.config import SpecError


def options(spec, device="cpu") -> dict:
    """`Projected`'s keyword arguments from `spec.compress` (the fixed part's precision resolved on `device`)."""
    c = spec.compress
    return dict(sides=c.sides, residual=c.residual, decay_projections=c.decay_projections, order=c.order,
                base_dtype=torch.bfloat16 if c.base_dtype == "bfloat16" else torch.float32,
                precision=resolve_fixed_precision(c.fixed_precision, device))


def base_device(spec, device: torch.device, teacher) -> torch.device:
    """Where the frozen base lives (`compress.base_device`); cpu offload refuses distillation off CPU."""
    if spec.compress.base_device == "cpu" and teacher is not None and device.type != "cpu":
        raise SpecError("compress.base_device", "cpu offload of the base cannot be combined with distill")
    return torch.device("cpu") if spec.compress.base_device == "cpu" else device


def build(base, plan, spec, device: torch.device, teacher=None) -> Projected:
    """`Projected(base, plan, ...)`: small network and projections on `device`, base on `base_device`."""
    where = base_device(spec, device, teacher)
    return Projected(base, plan, **options(spec, device)).place(device, where)
