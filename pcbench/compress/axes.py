"""The compression map: for each parameter of a Llama-family model, which axis each dim carries.

Everything else in `pcbench.compress` is generic over this map: importance scoring, the width
plan, hard pruning and Projected Compression never name a matrix. An axis label is an index-set
key: `d_model` (one set shared by every tensor) or `d_ff.<layer>` (one set per layer); `None`
means the dim is not compressed (vocabulary, attention heads and head_dim).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # annotations only: the memory plan reads CONFIG_WIDTH and axis_kind without torch
    from torch import nn

D_MODEL = "d_model"

# (parameter-name pattern, per-dim axis template). `{layer}` is filled from the match.
_L = r"model\.layers\.(?P<layer>\d+)"
LLAMA_FAMILY: list[tuple[str, tuple[Optional[str], ...]]] = [
    (r"model\.embed_tokens\.weight", (None, D_MODEL)),
    (r"lm_head\.weight", (None, D_MODEL)),
    (r"model\.norm\.weight", (D_MODEL,)),
    (_L + r"\.(input_layernorm|post_attention_layernorm)\.weight", (D_MODEL,)),
    (_L + r"\.self_attn\.[qkv]_proj\.weight", (None, D_MODEL)),
    (_L + r"\.self_attn\.[qkv]_proj\.bias", (None,)),
    (_L + r"\.self_attn\.[qk]_norm\.weight", (None,)),
    (_L + r"\.self_attn\.o_proj\.weight", (D_MODEL, None)),
    (_L + r"\.self_attn\.o_proj\.bias", (D_MODEL,)),
    (_L + r"\.mlp\.(gate|up)_proj\.weight", ("d_ff.{layer}", D_MODEL)),
    (_L + r"\.mlp\.(gate|up)_proj\.bias", ("d_ff.{layer}",)),
    (_L + r"\.mlp\.down_proj\.weight", (D_MODEL, "d_ff.{layer}")),
    (_L + r"\.mlp\.down_proj\.bias", (D_MODEL,)),
]

# Module outputs whose |activation| scores an axis ("minitron"-style importance).
ACTIVATION_SITES: list[tuple[str, str]] = [
    (_L + r"\.(input_layernorm|post_attention_layernorm)", D_MODEL),
    (_L + r"\.mlp\.up_proj", "d_ff.{layer}"),
]

# Which config field holds the width of each axis kind.
CONFIG_WIDTH = {D_MODEL: "hidden_size", "d_ff": "intermediate_size"}

SUPPORTED_MODEL_TYPES = ("llama", "arcee", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class TensorAxes:
    """A parameter name and the index-set key of each of its dims (None: not compressed)."""

    name: str
    dims: tuple[Optional[str], ...]

    @property
    def compressed(self) -> bool:
        return any(a is not None for a in self.dims)


def axis_kind(key: str) -> str:
    """`d_ff.3` -> `d_ff`; `d_model` -> `d_model`."""
    return key.split(".", 1)[0]


def _fill(template: Optional[str], m: re.Match) -> Optional[str]:
    return None if template is None else template.format(**m.groupdict())


def _match(rules, name: str):
    for pattern, template in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return m, template
    return None, None


def check_supported(model: nn.Module) -> None:
    """Refuse models the map does not describe, naming the reason."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {mt!r} is not in the compression map; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def tensor_axes(model: nn.Module) -> dict[str, TensorAxes]:
    """The axes of every (deduplicated) parameter of `model`; unknown parameter names raise."""
    check_supported(model)
    out: dict[str, TensorAxes] = {}
    for name, p in model.named_parameters():
        m, template = _match(LLAMA_FAMILY, name)
        if m is None:
            raise ValueError(f"parameter {name!r} is not in the compression map")
        dims = tuple(_fill(t, m) for t in template)
        if len(dims) != p.ndim:
            raise ValueError(f"{name}: map gives {len(dims)} dims, tensor has {p.ndim}")
        out[name] = TensorAxes(name, dims)
    return out


def index_set_sizes(model: nn.Module) -> dict[str, int]:
    """Full size of every index set (`d_model`, `d_ff.0`, ...), read off the tensors; sizes of one
    key must agree across tensors."""
    sizes: dict[str, int] = {}
    params = dict(model.named_parameters())
    for name, ax in tensor_axes(model).items():
        for dim, key in enumerate(ax.dims):
            if key is None:
                continue
            n = params[name].shape[dim]
            if sizes.setdefault(key, n) != n:
                raise ValueError(f"{name}: axis {key} has size {n}, elsewhere {sizes[key]}")
    return sizes


def activation_sites(model: nn.Module) -> dict[str, str]:
    """Module name -> index-set key scored by |output| of that module."""
    out = {}
    for name, _ in model.named_modules():
        m, template = _match(ACTIVATION_SITES, name)
        if m is not None:
            out[name] = _fill(template, m)
    return out
