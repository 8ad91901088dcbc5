"""Which torch device a `device` setting (`auto`, `cpu`, `cuda`, `cuda:1`, ...) means here: the one
resolution that training, evaluation and the benchmarks share."""

from __future__ import annotations

from typing import Optional

import torch


def resolve_device(pref: str = "auto", index: Optional[int] = None, what: str = "device") -> torch.device:
    """`auto`: CUDA when available (`cuda:<index>` given an index), else the CPU; any other name as
    torch reads it. Asking for CUDA where there is none raises RuntimeError naming `what`."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    device = torch.device("cuda", index) if pref in ("auto", "cuda") and index is not None else \
        torch.device("cuda" if pref == "auto" else pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{what} is {pref!r} but no CUDA device is available")
    return device
