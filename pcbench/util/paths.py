"""Where pcbench keeps things outside git: the download/token cache and the work directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root for fetched assets and token shards (`$PCBENCH_CACHE`, default `~/.cache/pcbench`)."""
    root = Path(os.environ.get("PCBENCH_CACHE", Path.home() / ".cache" / "pcbench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def work_dir() -> Path:
    """Root for checkpoints and exported weights (`$PCBENCH_WORK`, default `<cache>/work`)."""
    root = Path(os.environ.get("PCBENCH_WORK", cache_dir() / "work"))
    root.mkdir(parents=True, exist_ok=True)
    return root
