"""The registry of compression methods: one `Method` entry each, and the `Trainable` protocol.

A method is one builder module plus one entry in `METHODS`. Everything that names methods reads
this dict: spec validation (`compress.method`), the CLI's `--method` choices, the report's labels
and plot styles, the memory plan (`projected`) and the benchmarks. This module imports neither
torch nor transformers: the builder module is imported (`importlib`) only when a trainable is built.

A builder module defines `build(base, plan, spec, device, teacher) -> Trainable`: `base` the
pretrained HF model, `plan` its `compress.plan.Plan`, `spec` the `RunSpec`, `teacher` the frozen
teacher when distilling (else None). Adding a method: write `pcbench/methods/<name>.py` with
`build`, add its `Method` here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

from pcbench.util.suggest import did_you_mean

if TYPE_CHECKING:  # annotations only: importing this module stays torch-free
    import torch
    from torch import nn
    from transformers import PreTrainedModel


class Trainable(Protocol):
    """What the one training loop (`train.train`, `train.Stepper`, `parallel`) uses of a method's
    trainable; `pcbench.compress.trainable.Direct` is the plain implementation, subclassed by the others.
    Trainables are `nn.Module`s: `state_dict`/`load_state_dict` checkpoint them, `parameters()` and
    `buffers()` count their memory."""

    model: "PreTrainedModel"  # the (small) stock HF network: config, held-out loss, memory, export

    @property
    def network(self) -> "nn.Module":
        """The module micro-batches run through (`net(input_ids=...).logits`); usually `model`."""

    def param_groups(self, weight_decay: float, decay_norms: bool = False) -> list[dict]:
        """AdamW parameter groups of everything the optimiser steps."""

    def optimized_parameters(self) -> list["nn.Parameter"]:
        """The parameters the optimiser steps (clipped by the global norm)."""

    def before_step(self) -> None:
        """Called before the micro-batches of an optimiser step."""

    def after_backward(self) -> None:
        """Called once all micro-batch gradients have accumulated (and been all-reduced)."""

    def step_metrics(self, step: int) -> dict:
        """Extra metrics logged at `step` (PC: recovery)."""

    def fixed_flops_per_step(self) -> int:
        """FLOPs per optimiser step that do not scale with tokens."""

    def export(self) -> "PreTrainedModel":
        """The trained network as a stock HF model."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass(frozen=True)
class Method:
    """One compression method: its name in specs, how reports show it, and where its builder is."""

    name: str
    label: str  # how tables, legends and REPORT.md name it
    builder: str  # dotted module path defining `build(base, plan, spec, device, teacher)`
    projected: bool  # trains projections of a frozen base (PC-like); the memory plan counts them
    push: bool = False  # gradients reach P/R by one closed-form push per step (compressed clip, block-wise, fsdp)
    style: dict = field(default_factory=dict)  # matplotlib line style in the report's figures
    color: Optional[str] = None  # matplotlib colour in the report's figures
    doc: str = ""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("hpr", "HPR", "pcbench.methods.hpr", projected=False,
           style={"linestyle": "--", "marker": "s"}, color="tab:blue",
           doc="hard pruning of the base under the plan, then retraining every kept weight"),
    Method("pc", "PC", "pcbench.methods.pc", projected=True, push=True,
           style={"linestyle": "-", "marker": "o"}, color="tab:orange",
           doc="Projected Compression, cost-free: W_c materialised once per step, gradients pushed into P/R"),
    Method("pc-naive", "PC-naive", "pcbench.methods.pc_naive", projected=True,
           doc="Projected Compression by autograd through P.W.P in every micro-batch (the slow reference)"),
)}

COMPARED = ("hpr", "pc")  # the report's paired comparison: (baseline, proposed)


class UnknownMethod(ValueError):
    """A method name that is not in `METHODS`."""


def names() -> list[str]:
    """The registered method names, in registry order."""
    return list(METHODS)


def unknown(name: Any) -> str:
    """The one-line reason `name` is not a method: a "did you mean" and the known names."""
    return f"unknown method {name!r}{did_you_mean(name, METHODS)}; known: {', '.join(METHODS)}"


def get(name: str) -> Method:
    """The entry of `name`; `UnknownMethod` (one line, with a "did you mean") otherwise."""
    if name not in METHODS:
        raise UnknownMethod(unknown(name))
    return METHODS[name]


def argument(name: str) -> str:
    """argparse `type=` for `--method`: the name, or its one-line error with a "did you mean"."""
    if name not in METHODS:
        import argparse

        raise argparse.ArgumentTypeError(unknown(name))
    return name


def label(name: str) -> str:
    """How reports show `name` (unregistered names as they are)."""
    m = METHODS.get(str(name))
    return m.label if m else str(name)


def build(name: str, base, plan, spec, device: "torch.device", teacher=None) -> Trainable:
    """The trainable of method `name` (its builder module imported now)."""
    return importlib.import_module(get(name).builder).build(base, plan, spec, device, teacher)
