"""Hard pruning: slice the plan's kept indices out of every tensor -> a smaller stock model."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from pcbench.compress.axes import CONFIG_WIDTH, tensor_axes
from pcbench.compress.plan import Plan


def small_config(config, plan: Plan):
    """The base config with the plan's widths; head_dim made explicit (it must not follow d_model)."""
    cfg = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cfg.head_dim = head_dim
    for kind, width in plan.widths.items():
        setattr(cfg, CONFIG_WIDTH[kind], width)
    return cfg


def slice_tensor(w: torch.Tensor, dims, keep: dict[str, torch.Tensor]) -> torch.Tensor:
    """`w` restricted to the kept indices along every compressed dim."""
    for dim, key in enumerate(dims):
        if key is not None:
            w = w.index_select(dim, keep[key].to(w.device))
    return w


def empty_like_plan(model: PreTrainedModel, plan: Plan) -> PreTrainedModel:
    """An uninitialised model of the same class with the plan's widths (weights to be filled)."""
    cfg = small_config(model.config, plan)
    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(cfg)
    small = small.to_empty(device=next(model.parameters()).device).to(next(model.parameters()).dtype)
    small.tie_weights()  # to_empty unties shared tensors (tied embedding and head)
    return small


@torch.no_grad()
def prune(model: PreTrainedModel, plan: Plan) -> PreTrainedModel:
    """The hard-pruned model: same class, every tensor sliced to the plan's kept indices."""
    small = empty_like_plan(model, plan)
    params = dict(model.named_parameters())
    small_params = dict(small.named_parameters())
    axes = tensor_axes(model)
    if set(small_params) != set(params):
        raise ValueError("pruned model's parameters differ from the base's")
    for name, ax in axes.items():
        small_params[name].copy_(slice_tensor(params[name], ax.dims, plan.keep))
    # Buffers (rotary inv_freq) depend only on head_dim and rope settings, which pruning keeps.
    base_buffers = dict(model.named_buffers())
    for name, buf in small.named_buffers():
        if name not in base_buffers or base_buffers[name].shape != buf.shape:
            raise ValueError(f"buffer {name!r} cannot be carried over from the base model")
        buf.copy_(base_buffers[name])
    small.config.use_cache = False
    return small
