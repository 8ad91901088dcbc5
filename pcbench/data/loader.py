"""The next batch, cut in the background while the current step runs.

`Prefetcher(fetch, device, stop)` serves `get(step)`: the batch of `step` (from the thread when it
was prepared there, else cut now), and starts cutting `step + 1` on one background thread. On CUDA
the batch is pinned there and copied with `non_blocking=True`. Batches are a pure function of the
step (`tokens.Batches.get`), so they are bit-identical to cutting them in the loop.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch


class Prefetcher:
    def __init__(self, fetch: Callable[[int], torch.Tensor], device: torch.device, stop: int):
        self.fetch, self.device, self.stop = fetch, torch.device(device), stop
        self.pin = self.device.type == "cuda"
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(1, thread_name_prefix="pcbench-batches")
        self._next: Optional[tuple[int, Future]] = None

    def _load(self, step: int) -> torch.Tensor:
        b = self.fetch(step)
        return b.pin_memory() if self.pin else b

    def get(self, step: int) -> torch.Tensor:
        if self._next is not None and self._next[0] == step:
            batch = self._next[1].result()
        else:
            batch = self._load(step)
        self._next = None
        if step + 1 < self.stop and self._pool is not None:
            self._next = (step + 1, self._pool.submit(self._load, step + 1))
        return batch.to(self.device, non_blocking=self.pin)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._next = None
