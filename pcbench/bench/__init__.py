"""Benchmarks (`pcbench bench throughput|step-cost`). Each run writes one JSON (the step-cost
benchmark also a PNG) named `<name>-<hostname>-<YYYYmmdd-HHMMSS>` under `results/bench/`, holding
the config, the machine info, every measurement and the derived ratios. Speed is measured here,
never asserted in tests."""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from pcbench.atomic import temp_file
from pcbench.bench.machine import hostname


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued device work (timing boundaries)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: list[float]) -> dict:
    """Every repeat plus median/min/max."""
    return {"repeats": list(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "n": len(values)}


def run_stem(out: Path, name: str, suffix: str = "", when: Optional[float] = None) -> Path:
    """`<out>/<name>-<hostname>-<YYYYmmdd-HHMMSS><suffix>` (UTC time)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", hostname())
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when if when is not None else time.time()))
    return Path(out) / f"{name}-{host}-{stamp}{suffix}"


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically (temp file in the same dir + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)  # mode 0666 & ~umask (mkstemp's 0600 would make the plot private)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
