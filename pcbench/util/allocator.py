"""glibc malloc settings for a process that trains: freed tensor memory is kept for the next step.

By default glibc hands the top of its heap back to the kernel whenever 128 KiB of it are free
(its trim threshold) and serves large blocks by mmap (a dynamic threshold), so a CPU training
loop, which frees and reallocates the same activations every step, faults every page in again:
on the default study's 80:1 base that was 6.0M page faults and 9.7 s of system time in a 42 s run
(0.1M faults, 0.7 s, 34 s with these settings; the same losses, bit for bit). `tune` raises the
trim threshold to 256 MiB and fixes the mmap threshold at glibc's maximum, 32 MiB: blocks above it
are still mapped and unmapped, so what a process holds on to is bounded.

Nothing is changed when the user set a `MALLOC_*` variable or a malloc `GLIBC_TUNABLES` (glibc reads those itself), when
`PCBENCH_MALLOC=system`, or off glibc.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 256 << 20
MMAP_THRESHOLD = 32 << 20  # glibc caps it at HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit

_tuned = False


def tune() -> bool:
    """Apply the settings once per process (a fork inherits them); True when they are in effect."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("PCBENCH_MALLOC", "").strip() == "system":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator policy stands
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
