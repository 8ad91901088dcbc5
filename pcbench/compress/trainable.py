"""What the one training loop trains: the network tokens run through, and how gradients reach the
optimised parameters. Pretraining and HPR train the network directly (`Direct`); Projected
Compression (`pcbench.compress.projected.Projected`) optimises projections of a frozen base and
only borrows the network's weight gradients."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel


def decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 decay_filter=lambda name, p: p.ndim >= 2, decay_norms: bool = False) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norms, biases) do not, unless `decay_norms`."""
    decay, no_decay = [], []
    for name, p in named:
        (decay if decay_norms or decay_filter(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Direct(nn.Module):
    """Train every parameter of `model` (pretraining, hard pruning with retraining)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    @property
    def network(self) -> nn.Module:
        """The module micro-batches run through (the protocol in `pcbench.spec.methods`)."""
        return self.model

    def param_groups(self, weight_decay: float, decay_norms: bool = False) -> list[dict]:
        return decay_groups(self.model.named_parameters(), weight_decay, decay_norms=decay_norms)

    def optimized_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups(0.0) for p in g["params"]]

    def before_step(self) -> None:
        """Called before the micro-batches of an optimiser step."""

    def after_backward(self) -> None:
        """Called once all micro-batch gradients have accumulated (and been all-reduced)."""

    def step_metrics(self, step: int) -> dict:
        """Extra metrics logged at `step` (e.g. PC recovery)."""
        return {}

    def fixed_flops_per_step(self) -> int:
        """FLOPs per optimiser step that do not scale with tokens."""
        return 0

    def export(self) -> PreTrainedModel:
        """The trained network as a stock HF model."""
        return self.model
