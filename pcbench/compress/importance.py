"""Importance scores per index set: magnitude, activation-based ("minitron") and random."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from pcbench.compress.axes import activation_sites, index_set_sizes, tensor_axes

KINDS = ("magnitude", "activation", "random")


@torch.no_grad()
def magnitude(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per index set, the mean over matrices carrying it of the L2 norm taken over the other dim
    (columns of embedding/head/q/k/v/up/gate, rows of o/down for d_model; rows of up/gate and
    columns of down for d_ff). 1-D tensors (norms) do not vote."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    params = dict(model.named_parameters())
    for name, ax in tensor_axes(model).items():
        w = params[name]
        if w.ndim != 2:
            continue
        for dim, key in enumerate(ax.dims):
            if key is None:
                continue
            norms = w.float().norm(dim=1 - dim)
            sums[key] = sums.get(key, 0) + norms
            counts[key] = counts.get(key, 0) + 1
    return {k: (sums[k] / counts[k]).cpu() for k in sums}


@torch.no_grad()
def activation(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum over calibration tokens of |output| of the pre-attention/pre-FFN norms (d_model) and of
    the up projection (d_ff, per layer). `batches` yields token ids [rows, seq]."""
    sites = activation_sites(model)
    scores: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(key: str) -> Callable:
        def hook(_module, _inputs, output):
            s = output.detach().float().abs().sum(dim=tuple(range(output.ndim - 1))).cpu()
            scores[key] = scores.get(key, 0) + s
        return hook

    modules = dict(model.named_modules())
    for name, key in sites.items():
        handles.append(modules[name].register_forward_hook(hook_for(key)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        n = 0
        for ids in batches:
            model(input_ids=ids.to(device))
            n += 1
        if n == 0:
            raise ValueError("activation importance needs at least one calibration batch")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = set(index_set_sizes(model)) - set(scores)
    if missing:
        raise ValueError(f"no activation site scored {sorted(missing)}")
    return scores


def random(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores from a seeded generator (independent per index set)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(n, generator=g) for k, n in sorted(index_set_sizes(model).items())}


def score(model: nn.Module, kind: str, *, seed: int = 0,
          batches: Iterable[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Dispatch on `kind` (magnitude | activation | random)."""
    if kind == "magnitude":
        return magnitude(model)
    if kind == "activation":
        if batches is None:
            raise ValueError("activation importance needs calibration batches")
        return activation(model, batches)
    if kind == "random":
        return random(model, seed)
    raise ValueError(f"unknown importance {kind!r}; choose from {', '.join(KINDS)}")
