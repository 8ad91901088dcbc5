"""Benchmarks (`pcbench bench throughput|step-cost`). Each run writes one JSON (the step-cost
benchmark also a PNG) named `<name>-<hostname>-<YYYYmmdd-HHMMSS>` under `results/bench/`, holding
the config, the machine info, every measurement and the derived ratios. Speed is measured here,
never asserted in tests.

May import every room up to `train`. Imported by `cli`.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from pcbench.util.atomic import write_png
from pcbench.bench.machine import hostname
from pcbench.util.devices import resolve_device  # noqa: F401 - the benchmarks' --device


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
    """Write a benchmark's matplotlib figure as PNG atomically (`atomic.write_png`) and close it."""
    import matplotlib.pyplot as plt

    try:
        write_png(path, fig, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
