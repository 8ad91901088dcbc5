"""Window orders for `tokens.Batches`: memory-flat for large stores.

Up to `PERMUTATION_MAX_WINDOWS` windows an epoch's order is today's: `np.random.Generator(PCG64(
SeedSequence([seed, epoch]))).permutation(n_windows)` (the committed CPU studies keep their exact
batches; 4M windows is 32 MB of int64 per cached epoch). Above it, the order is a keyed bijection
of [0, n_windows) that needs no table: a balanced Feistel network over the smallest even number of
bits that covers n (6 rounds of a splitmix64-based round function keyed by `SeedSequence([seed,
epoch])`), with cycle-walking until the image falls below n. Window `i` of epoch `e` is computed
in O(1) time and memory, so the first batch of a 100B-token store is as fast as of a small one,
and resuming is the step counter alone.
"""

from __future__ import annotations

import numpy as np

PERMUTATION_MAX_WINDOWS = 1 << 22
ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64, wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class Feistel:
    """A keyed bijection of [0, n): `Feistel(n, seed, epoch)(idx)` maps an int array elementwise."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = int(n)
        bits = max(2, int(self.n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = np.random.SeedSequence([int(seed), int(epoch), 0xFE15]).generate_state(ROUNDS, dtype=np.uint64)

    def _once(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx) -> np.ndarray:
        x = np.asarray(idx, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"index out of [0, {self.n})")
        y = self._once(x.astype(np.uint64))
        n = np.uint64(self.n)
        out_of = y >= n
        while out_of.any():  # cycle-walking: stays a bijection of [0, n)
            y[out_of] = self._once(y[out_of])
            out_of = y >= n
        return y.astype(np.int64)


def window_order(n_windows: int, seed: int, epoch: int, idx: np.ndarray, permutation=None) -> np.ndarray:
    """Windows at positions `idx` of epoch `epoch`: today's permutation (`permutation(epoch)`) for
    stores up to PERMUTATION_MAX_WINDOWS windows, the Feistel bijection above it."""
    if n_windows <= PERMUTATION_MAX_WINDOWS:
        return permutation(epoch)[idx]
    return Feistel(n_windows, seed, epoch)(idx)
