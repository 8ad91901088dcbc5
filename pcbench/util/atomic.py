"""Atomic file writes, locked appends and owner locks: a reader never sees half a file.

`OwnerLock` is an exclusive advisory lock (flock) held by one process for as long as it works on
something (e.g. trains a run); the kernel releases it when that process dies, so it is taken over
only from a dead holder. Its file holds the holder's pid and host, for messages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional


def temp_file(path: Path) -> tuple[int, str]:
    """A new, exclusively created temp file next to `path`: (fd, name). Mode 0666 & ~umask, as a plain
    open() gives (tempfile.mkstemp makes 0600, which would leave every atomic write private)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_png(path: str | os.PathLike, fig: Any, **savefig: Any) -> Path:
    """Write a matplotlib figure as PNG atomically: rendered in memory (`fig.savefig(**savefig)`), then
    `write_bytes`. The one PNG writer of the report and the benchmarks; it never imports matplotlib."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    write_bytes(path, buf.getvalue())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write, sorted keys, trailing newline (stable bytes for identical content)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if missing); blocks until held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line under an exclusive lock, so concurrent writers never interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    with open(path, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_jsonl(path: str | os.PathLike, problems: Optional[list[str]] = None) -> list[dict]:
    """Read a JSON-lines file; unreadable lines (a torn last line after a crash) are skipped and,
    when `problems` is given, described there ("line N: ...")."""
    out: list[dict] = []
    path = Path(path)
    if not path.exists():
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if problems is not None:
                    problems.append(f"line {n}: unreadable JSON ({e.msg}), skipped")
                continue
            if isinstance(rec, dict):
                out.append(rec)
            elif problems is not None:
                problems.append(f"line {n}: not a JSON object, skipped")
    return out


class OwnerLock:
    """An exclusive lock on `path`, held by this process until `release()` (or its death)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OwnerLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_owner_lock(path: str | os.PathLike, wait_s: float = 1.0) -> Optional[OwnerLock]:
    """Take the lock on `path` (created if missing), trying for up to `wait_s` seconds; None if a
    live process holds it. On success the file records this process's pid and host."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return None
                raise
            time.sleep(0.02)  # a reader's probe holds it for microseconds
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
    return OwnerLock(path, fd)


def lock_holder(path: str | os.PathLike) -> Optional[dict]:
    """{pid, host, since} of the live holder of the lock on `path`, or None when nobody holds it.
    (Probes with a shared lock for an instant: it never blocks, and never takes over.)"""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                info = {}
            return info if isinstance(info, dict) else {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
