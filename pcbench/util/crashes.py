"""A native crash of a training process leaves the Python stack of every thread in its log.

glibc's heap checks ("double free or corruption", SIGABRT), a segfault in a kernel or in a
collective's thread end the process without a Python traceback; the log then says which rank died
but not where. `enable` turns on Python's `faulthandler` for SIGSEGV, SIGFPE, SIGABRT, SIGBUS and
SIGILL: the handler writes every thread's stack to stderr (the job's log), then the signal's default
action runs, so the exit status stays the signal's. Idempotent; a stream the user chose
(`PYTHONFAULTHANDLER`, `-X faulthandler`, or their own `faulthandler.enable`) is left as it is.
"""

from __future__ import annotations

import faulthandler
import sys


def enable() -> bool:
    """Stacks of all threads on a fatal signal, to stderr; True when they are (now or already)."""
    if faulthandler.is_enabled():
        return True
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # stderr closed or without a file descriptor
        return False
    return True
