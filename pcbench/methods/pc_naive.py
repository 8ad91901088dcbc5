"""`pc-naive`: Projected Compression the slow way, autograd through P.W.P in every micro-batch.

Each micro-batch forward materialises every W_c = P_out W P_in (+ R) inside the graph
(`Projected.reference_logits`), so gradients reach P and R through autograd; there is no per-step
materialise or push. It is the same gradient as `pc` (whose push runs the products this backward
runs), so it trains to the same losses and export up to float rounding, at the cost of one
materialisation and its backward per micro-batch instead of per step (`pcbench bench step-cost`
measures the difference).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from pcbench.compress.projected import Projected
from pcbench.methods import pc


class NaiveProjected(Projected):
    """`Projected` whose micro-batches run through `network` (a `NaiveNet`). The small network's
    projected weights are not trained (no gradient reaches them); after the backward they get the
    W_c of the step's last forward (a copy, no product), so the small network is current as under
    `pc` (held-out loss during training, export). `micro_batches`: per optimiser step, for the
    fixed FLOPs."""

    def __init__(self, base, plan, micro_batches: int = 1, **kw):
        super().__init__(base, plan, **kw)
        self.micro_batches = micro_batches
        self._last: dict[str, torch.Tensor] = {}
        small = dict(self.model.named_parameters())
        for name in self.names.values():
            small[name].requires_grad_(False)  # replaced in the forward; DDP needs no unused grads

    @property
    def network(self) -> nn.Module:
        return NaiveNet(self)

    def before_step(self) -> None:
        pass

    @torch.no_grad()
    def after_backward(self) -> None:
        """Copy the last forward's W_c into the small network (its weights at the start of this step)."""
        small = dict(self.model.named_parameters())
        for name, w in self._last.items():
            small[name].copy_(w)
        self._last = {}

    def fixed_flops_per_step(self) -> int:
        """Per micro-batch, materialise once and run its backward (the products of the push)."""
        return self.micro_batches * sum(t.flops() + t.push_flops(cache=True) for t in self.tensors.values())

    @torch.no_grad()
    def export(self):
        Projected.before_step(self)
        for t in self.tensors.values():
            t._mid = None
        return self.model


class NaiveNet(nn.Module):
    """The network micro-batches run through: logits with every W_c computed inside the forward."""

    def __init__(self, pc: NaiveProjected):
        super().__init__()
        self.pc = pc

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        pc = self.pc
        weights = {pc.names[k]: t.materialise() for k, t in pc.tensors.items()}
        if torch.is_grad_enabled():
            pc._last = {n: w.detach() for n, w in weights.items()}
        logits = torch.func.functional_call(pc.model, weights, (input_ids,), strict=False).logits
        return SimpleNamespace(logits=logits)


def build(base, plan, spec, device: torch.device, teacher=None) -> NaiveProjected:
    """`NaiveProjected(base, plan, ...)` with `pc`'s options and placement."""
    t = spec.train
    micro_batches = t.batch_size // (t.micro_batch_size or t.batch_size)  # one process
    where = pc.base_device(spec, device, teacher)
    return NaiveProjected(base, plan, micro_batches=micro_batches, **pc.options(spec)).place(device, where)
