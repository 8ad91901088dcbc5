"""glibc malloc settings for a process that trains: freed tensor memory is kept for the next step.

By default glibc hands the top of its heap back to the kernel whenever 128 KiB of it are free
(its trim threshold) and serves large blocks by mmap (a dynamic threshold), so a CPU training
loop, which frees and reallocates the same activations every step, faults every page in again:
on the default study's 80:1 base that was 6.0M page faults and 9.7 s of system time in a 42 s run
(0.1M faults, 0.7 s, 34 s with these settings; the same losses, bit for bit). The settings raise
the trim threshold to 256 MiB and fix the mmap threshold at glibc's maximum, 32 MiB: blocks above
it are still mapped and unmapped, so what a process holds on to is bounded.

They are never changed under running threads: mallopt rewrites malloc parameters that threads
on other arenas read without a lock (glibc's malloc.c), so `tune` calls it only in a process that
has one thread (the CLI, before its imports start any), and a process pcbench starts gets them
from `env()` in its environment, which glibc reads at exec, before any thread exists (the local
job processes, the fork server, SLURM jobs). A process with threads and without them in its
environment keeps glibc's defaults.

Nothing is changed when the user set a `MALLOC_*` variable or a malloc `GLIBC_TUNABLES` (glibc reads
those itself), when `PCBENCH_MALLOC=system`, or off glibc.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 256 << 20
MMAP_THRESHOLD = 32 << 20  # glibc caps it at HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit
# The same settings as glibc reads them from the environment at exec (malloc's tunables' aliases).
ENV = {"MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD), "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}

_tuned = False


def _mallopt():
    try:
        f = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator policy stands
        return None
    f.argtypes, f.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return f


def _from_env(environ) -> bool:
    """Were exactly these settings (and no other malloc setting) given in `environ`?"""
    mine = {k: v for k, v in environ.items() if k.startswith("MALLOC_")}
    return mine == ENV and "malloc" not in environ.get("GLIBC_TUNABLES", "")


def _users_own(environ) -> bool:
    """Did the user choose: PCBENCH_MALLOC=system, or a malloc setting of their own?"""
    if environ.get("PCBENCH_MALLOC", "").strip() == "system":
        return True
    return not _from_env(environ) and (any(k.startswith("MALLOC_") for k in environ)
                                       or "malloc" in environ.get("GLIBC_TUNABLES", ""))


def threads() -> Optional[int]:
    """The number of threads of this process (None where /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def env(environ=None) -> dict[str, str]:
    """The variables that give a process pcbench starts these settings from its exec (glibc reads
    them before any thread exists); empty when the user chose otherwise or off glibc."""
    environ = os.environ if environ is None else environ
    if _users_own(environ) or _mallopt() is None:
        return {}
    return dict(ENV)


def tune() -> bool:
    """The settings for this process, once (a fork inherits them); True when they are in effect:
    given in the environment at exec, or applied now by mallopt when this process has one thread.
    False, and nothing changed, when the user chose otherwise, off glibc, or with threads running."""
    global _tuned
    if _tuned:
        return True
    if _users_own(os.environ):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if _from_env(os.environ):  # glibc applied them at exec
        _tuned = True
        return True
    if threads() != 1:  # mallopt under running threads can corrupt the heap: leave the defaults
        return False
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
