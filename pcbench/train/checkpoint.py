"""Training checkpoints: written atomically with a checksum manifest; corruption detected on load.

Layout: `<ckpt_root>/step_00000100/{state.pt, manifest.json}`. A checkpoint directory only
appears (by rename) once both files are complete, so a crash mid-write leaves no half checkpoint.
On resume the newest checkpoint is verified (size + sha256); a corrupt one is reported, renamed
aside (never deleted) and the next older valid one is used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from pcbench.util.atomic import read_json, write_json

log = logging.getLogger(__name__)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint failed verification (truncated, altered or unreadable)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints. A write
    that fails (a full disk) leaves nothing behind; temp dirs of earlier writers (dead: one process
    trains a run at a time) are removed first."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    sweep_partial(root)
    tmp = root / f".step_{step:08d}.tmp{os.getpid()}"
    tmp.mkdir()
    try:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        with open(tmp / "state.pt", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        write_json(tmp / "manifest.json", {"step": step, "files": {
            "state.pt": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}})
        if final.exists():  # same step written again (e.g. after a resume): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:  # a full disk: name the checkpoint
            raise OSError(e.errno, e.strerror or str(e), str(final)) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sweep_partial(root: Path) -> None:
    """Remove the half-written checkpoints (`.step_*.tmp*`) under `root`: called by the one process
    that trains the run, so they are a dead writer's (or this process's own failed write)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and "." not in p.name)


def verify(path: Path) -> None:
    """Raise CorruptCheckpoint naming the file and what is wrong."""
    manifest = path / "manifest.json"
    try:
        files = read_json(manifest)["files"]
    except Exception as e:  # noqa: BLE001 - any unreadable manifest is corruption
        raise CorruptCheckpoint(f"{manifest}: unreadable manifest ({e})") from None
    for name, meta in files.items():
        f = path / name
        if not f.exists():
            raise CorruptCheckpoint(f"{f}: missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CorruptCheckpoint(f"{f}: {size} bytes, expected {meta['bytes']} (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise CorruptCheckpoint(f"{f}: sha256 mismatch (corrupted)")


def load(path: Path, map_location="cpu") -> dict[str, Any]:
    """Verify and load one checkpoint."""
    verify(path)
    return torch.load(path / "state.pt", map_location=map_location, weights_only=False)


def load_latest(root: Path, map_location="cpu") -> tuple[Optional[dict[str, Any]], list[str]]:
    """The newest valid checkpoint's state (None if there is none) and a list of problems found
    (see `newest_valid`)."""
    path, problems = newest_valid(root)
    if path is None:
        return None, problems
    return torch.load(path / "state.pt", map_location=map_location, weights_only=False), problems


def newest_valid(root: Path) -> tuple[Optional[Path], list[str]]:
    """The newest checkpoint that passes `verify` (None if there is none) and the problems found.

    Corrupt checkpoints are renamed to `<name>.corrupt` (kept for inspection). If checkpoints
    exist but none is valid, raise CorruptCheckpoint: silently restarting from scratch would
    discard work.
    """
    problems: list[str] = []
    found = list_checkpoints(root)
    for path in reversed(found):
        try:
            verify(path)
            return path, problems
        except CorruptCheckpoint as e:
            problems.append(str(e))
            log.warning("corrupt checkpoint skipped: %s", e)
            aside = path.with_name(path.name + ".corrupt")
            if not aside.exists():
                path.rename(aside)
    if found:
        raise CorruptCheckpoint("no valid checkpoint left: " + "; ".join(problems))
    return None, problems
