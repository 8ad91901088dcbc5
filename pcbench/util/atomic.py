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
import re
import secrets
import shutil
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


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError that names no file (a full disk: `os.write` says only "No space left on device")
    raised inside is raised again naming `path`, the output being written."""
    try:
        yield
    except shutil.Error as e:  # copytree's list of (src, dst, why): the first, as the output's error
        first = e.args[0][0] if e.args and isinstance(e.args[0], list) and e.args[0] else None
        why = str(first[2]) if isinstance(first, tuple) and len(first) == 3 else str(e)
        m = re.match(r"\[Errno (\d+)\] ([^:]*)", why)
        raise OSError(int(m.group(1)) if m else errno.EIO, m.group(2) if m else why, str(path)) from e
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    with naming(path):
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


# ---------------------------------------------------------------------------------------------
# Whole directories: built in a temp dir beside the target (named by the writer's host and pid, so
# a later writer can tell a dead writer's leftovers from a live one's), then put in place by rename.

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_dir(target: str | os.PathLike, tag: str = "tmp") -> Path:
    """A new directory beside `target`, `.<name>.<host>.<pid>.<hex>.<tag>`, mode 0755 & ~umask."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.parent / f".{target.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(6)}.{tag}"
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue


def _leftover(name: str, target_name: str) -> Optional[tuple[str, int]]:
    """(host, pid) of a `temp_dir` of `target_name` called `name`, None for any other name."""
    m = re.fullmatch(rf"\.{re.escape(target_name)}\.([A-Za-z0-9-]+)\.(\d+)\.[0-9a-f]{{12}}\.(?:tmp|old)", name)
    return (m.group(1), int(m.group(2))) if m else None


def sweep_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temp dirs of `target` (see `temp_dir`) left by dead writers on this host (a
    writer on another host, or one alive here, is left alone); returns those removed."""
    target = Path(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for e in entries:
        who = _leftover(e.name, target.name)
        if who is None or who[0] != _HOST or who[1] == os.getpid() or _pid_alive(who[1]):
            continue
        p = Path(e.path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    global _renameat2
    if _renameat2 is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            _renameat2 = libc.renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    import ctypes

    at_fdcwd, exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_renameat2: Any = None


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished directory `tmp` (a `temp_dir` of `target`) at `target`: one rename when
    `target` is missing, else one exchange (readers see the old directory or the new one, never a
    mix), after which the old one is removed. Only for directories that pcbench owns whole."""
    tmp, target = Path(tmp), Path(target)
    try:
        os.rename(tmp, target)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
            raise
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    old = temp_dir(target, "old")
    old.rmdir()
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
