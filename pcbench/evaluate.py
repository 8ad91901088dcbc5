"""Evaluation: held-out loss of a network, and downstream scoring through lm-eval."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision auto/bf16), nothing on CPU unless bf16 is asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def heldout_loss(model: nn.Module, batches, device: torch.device, precision: str = "auto") -> float:
    """Mean next-token cross-entropy over `batches` (token ids [rows, seq+1]); NaN if none."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            with autocast_for(device, precision):
                logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count if count else math.nan
