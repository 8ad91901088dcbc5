"""Graceful stops: SIGINT (Ctrl-C), SIGTERM, SIGHUP (a closed terminal) and SIGQUIT (Ctrl-\\) become
`Interrupted`, raised where it is safe.

Inside `graceful()` (main thread; the old handlers come back on exit) the first signal is recorded.
Outside a `deferred()` block it also raises `Interrupted` at once (like KeyboardInterrupt, but the
caller prints one line and exits 128+signum); inside one (a training step, a checkpoint write) it is
only recorded, and the code calls `stop_if_requested()` at its next safe point. Later signals (a
terminal's Ctrl-C reaches a launcher and its job, which the launcher also forwards) change nothing.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(BaseException):
    """Stopped by a signal; `exit_code` is the shell's 128+signum (130 for SIGINT, 143 for SIGTERM,
    129 for SIGHUP, 131 for SIGQUIT)."""

    def __init__(self, signum: int, step: Optional[int] = None):
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by {self.name}" + (f" at step {step}" if step is not None else ""))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"signum": None, "defer": 0, "active": 0}


def _handler(signum, frame) -> None:
    first = _state["signum"] is None
    if first:
        _state["signum"] = signum
    if first and _state["defer"] == 0:
        raise Interrupted(signum)


def requested() -> Optional[int]:
    """The signal received inside `graceful()`, if any."""
    return _state["signum"]


def stop_if_requested(step: Optional[int] = None) -> None:
    if _state["signum"] is not None:
        raise Interrupted(_state["signum"], step)


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into `Interrupted` for the duration (no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    if _state["active"] == 0:
        _state["signum"] = None
    _state["active"] += 1
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        _state["active"] -= 1
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a signal must not cut: it is recorded, and acted on at `stop_if_requested()`."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


def close_process_group() -> None:
    """Destroy this process's torch.distributed group, if it has one: gloo/NCCL threads joined."""
    if "torch.distributed" not in sys.modules:  # never imported: no group (and no torch import now)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def group_closed_at_an_agreed_end() -> Iterator[None]:
    """Close the process group before the process exits when every rank ends at the same point:
    the block returned, or raised `Interrupted` with a step (the loop stops all ranks after the same
    step, so no collective is in flight). A gloo thread alive at interpreter exit aborts the
    process (SIGABRT, "terminate called without an active exception") when it drops the last
    reference of a finished collective's tensors: that needs the GIL, which Python's finalisation
    no longer gives (pytorch/pytorch#190489); closing the group first joins those threads. Any
    other exception leaves the group alone: a rank may be inside a collective that its peers never
    join, and closing would wait for it."""
    try:
        yield
    except Interrupted as e:
        if e.step is not None:
            close_process_group()
        raise
    close_process_group()
