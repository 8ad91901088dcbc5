"""A compression plan: target widths for a share of parameters removed, and the kept indices."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pcbench.compress.axes import D_MODEL, axis_kind, index_set_sizes, tensor_axes


@dataclass
class Plan:
    """Kept indices per index set (`d_model`, `d_ff.<layer>`), sorted ascending, and the widths.

    `compression` is the requested share of ALL parameters removed (embeddings and head
    included); `achieved` the exact share of the resulting model.
    """

    compression: float
    widths: dict[str, int]  # axis kind -> new width
    keep: dict[str, torch.Tensor] = field(repr=False)
    params_before: int = 0
    params_after: int = 0

    @property
    def achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def dropped(self, key: str, full: int) -> torch.Tensor:
        """Indices of `key` that hard pruning removes."""
        mask = torch.ones(full, dtype=torch.bool)
        mask[self.keep[key]] = False
        return mask.nonzero().flatten()

    def to_dict(self) -> dict:
        return {"compression": self.compression, "achieved": self.achieved, "widths": dict(self.widths),
                "params_before": self.params_before, "params_after": self.params_after,
                "keep": {k: v.tolist() for k, v in sorted(self.keep.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(compression=d["compression"], widths=dict(d["widths"]),
                   keep={k: torch.tensor(v, dtype=torch.long) for k, v in d["keep"].items()},
                   params_before=d["params_before"], params_after=d["params_after"])


def count_with_widths(model: nn.Module, widths: dict[str, int]) -> int:
    """Parameter count of `model` if every axis of kind k had width `widths[k]` (tied counted once)."""
    params = dict(model.named_parameters())
    total = 0
    for name, ax in tensor_axes(model).items():
        n = 1
        for dim, key in enumerate(ax.dims):
            n *= params[name].shape[dim] if key is None else widths[axis_kind(key)]
        total += n
    return total


def width_options(model: nn.Module, align: int = 1) -> list[tuple[dict[str, int], int]]:
    """Every (widths, parameter count) a plan can choose: d_model in steps of lcm(align, heads),
    d_ff keeping its ratio to d_model (a multiple of `align`); ascending, the full width last."""
    sizes = index_set_sizes(model)
    full = {axis_kind(k): n for k, n in sizes.items()}
    d, f = full[D_MODEL], full.get("d_ff")
    # transformers' Llama-family configs refuse a hidden size that is not a multiple of the head
    # count (even with an explicit head_dim), so d_model moves in steps of lcm(align, heads).
    heads = getattr(getattr(model, "config", None), "num_attention_heads", 1) or 1
    d_step = math.lcm(align, heads)

    def widths_for(dm: int) -> dict[str, int]:
        w = {D_MODEL: dm}
        if f is not None:
            w["d_ff"] = max(align, int(round(dm * f / d / align)) * align)
        return w

    return [(widths_for(dm), count_with_widths(model, widths_for(dm))) for dm in range(d_step, d + 1, d_step)]


def achievable(model: nn.Module, align: int = 1) -> list[float]:
    """The shares of all parameters removed that a plan can reach (ascending; 0 would remove nothing)."""
    sizes = index_set_sizes(model)
    total = count_with_widths(model, {axis_kind(k): n for k, n in sizes.items()})
    return sorted({1 - n / total for w, n in width_options(model, align) if w[D_MODEL] < sizes[D_MODEL]})


def target_widths(model: nn.Module, compression: float, align: int = 1) -> dict[str, int]:
    """Widths (d_model, d_ff), keeping their ratio and multiples of `align` (d_model also of the
    head count), whose parameter count is closest to (1 - compression) x the model's."""
    if not 0 < compression < 1:
        raise ValueError(f"compression must be in (0, 1), got {compression}")
    sizes = index_set_sizes(model)
    full = {axis_kind(k): n for k, n in sizes.items()}
    d = full[D_MODEL]
    target = (1 - compression) * count_with_widths(model, full)
    best, best_err = None, math.inf
    for widths, n in width_options(model, align):
        err = abs(n - target)
        if err < best_err:
            best, best_err = widths, err
    if best is None or best[D_MODEL] >= d:
        raise ValueError(f"compression {compression} leaves no room to shrink d_model={d}")
    return best


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties broken by lower index), sorted ascending."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:k].sort().values


def make_plan(model: nn.Module, compression: float, scores: dict[str, torch.Tensor], align: int = 1) -> Plan:
    """Plan for `model` at `compression`, keeping the top-scored indices of every index set."""
    widths = target_widths(model, compression, align)
    sizes = index_set_sizes(model)
    missing = set(sizes) - set(scores)
    if missing:
        raise ValueError(f"importance scores missing for {sorted(missing)}")
    keep = {}
    for key, n in sizes.items():
        if scores[key].numel() != n:
            raise ValueError(f"scores for {key} have {scores[key].numel()} entries, axis has {n}")
        keep[key] = top_k(scores[key], widths[axis_kind(key)])
    full = {axis_kind(k): n for k, n in sizes.items()}
    return Plan(compression=compression, widths=widths, keep=keep,
                params_before=count_with_widths(model, full),
                params_after=count_with_widths(model, widths))
