"""`hpr`: hard pruning with retraining. The base is pruned under the plan (`compress.prune`) and
every kept weight of the small network is trained directly (`trainable.Direct`)."""

from __future__ import annotations

import torch

from pcbench.compress.prune import prune
from pcbench.compress.trainable import Direct


def build(base, plan, spec, device: torch.device, teacher=None) -> Direct:
    """`Direct(prune(base, plan))` on `device`."""
    return Direct(prune(base, plan)).to(device)
