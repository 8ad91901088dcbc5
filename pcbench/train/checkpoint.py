"""Training checkpoints: written atomically with a checksum manifest; corruption detected on load.

Layout: `<ckpt_root>/step_00000100/{state.pt, manifest.json}`. A checkpoint directory only
appears (by rename) once both files are complete, so a crash mid-write leaves no half checkpoint.
On resume the newest checkpoint is verified (size + sha256, `pcbench.util.verify`); a damaged one
is named in one warning line, renamed aside (`<name>.corrupt`, never deleted) and the next older
valid one is used, or, when none is left, training starts from step 0. A checkpoint records the
`owner` (the lineage of the records that started the run, `store.claim_work`) in its manifest; one
of another owner is renamed aside (`<name>.stale`) and never resumed.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from pcbench.util import verify as verify_
from pcbench.util.atomic import read_json, write_json

log = logging.getLogger(__name__)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint failed verification (truncated, altered or unreadable)."""


def save(root: Path, step: int, state: dict[str, Any], keep: int = 2, owner: Optional[str] = None) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints. A write
    that fails (a full disk) leaves nothing behind; temp dirs of earlier writers (dead: one process
    trains a run at a time) are removed first. `owner`: the lineage the checkpoint belongs to
    (recorded in its manifest)."""
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
        manifest = {"step": step, "files": {"state.pt": {"bytes": len(data), "sha256": verify_.sha256_bytes(data)}}}
        if owner is not None:
            manifest["owner"] = owner
        write_json(tmp / "manifest.json", manifest)
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
        try:
            verify_.verify_file(path / name, meta["sha256"], size=meta["bytes"], what="checkpoint", cache=False)
        except verify_.Damaged as e:
            raise CorruptCheckpoint(str(e)) from None


def load(path: Path, map_location="cpu") -> dict[str, Any]:
    """Verify and load one checkpoint."""
    verify(path)
    return torch.load(path / "state.pt", map_location=map_location, weights_only=False)


def load_latest(root: Path, map_location="cpu", owner: Optional[str] = None) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The newest valid checkpoint's state (None if there is none) and a list of problems found
    (see `newest_valid`)."""
    path, problems = newest_valid(root, owner)
    if path is None:
        return None, problems
    return torch.load(path / "state.pt", map_location=map_location, weights_only=False), problems


def owner_of(path: Path) -> Optional[str]:
    """The owner recorded in checkpoint `path`'s manifest (None: none recorded, or unreadable)."""
    try:
        return read_json(path / "manifest.json").get("owner")
    except Exception:  # noqa: BLE001 - verify() names an unreadable manifest
        return None


def newest_valid(root: Path, owner: Optional[str] = None) -> tuple[Optional[Path], list[str]]:
    """The newest checkpoint that passes `verify` and belongs to `owner` (None if there is none)
    and the problems found.

    A damaged checkpoint is named in one warning line and renamed to `<name>.corrupt` (kept for
    inspection); one recorded for another owner is renamed to `<name>.stale`. When none is left the
    run starts from step 0, with a warning line (the damaged files are kept aside).
    """
    problems: list[str] = []
    found = list_checkpoints(root)
    for path in reversed(found):
        try:
            verify(path)
            mine = owner_of(path)
            if owner is not None and mine is not None and mine != owner:
                problems.append(f"{path}: belongs to other records (owner {mine})")
                _aside(path, ".stale")
                continue
            if problems:
                verify_.warn(f"{'; '.join(problems)}: resuming from the checkpoint of step {_step(path)} instead")
            return path, problems
        except CorruptCheckpoint as e:
            problems.append(str(e))
            _aside(path, ".corrupt")
    if problems:
        verify_.warn(f"{'; '.join(problems)}: no good checkpoint left, training from step 0 "
                     "(the damaged ones are kept beside, renamed)")
    return None, problems


def _step(path: Path) -> int:
    return int(path.name.split("_")[-1])


def _aside(path: Path, suffix: str) -> None:
    aside = path.with_name(path.name + suffix)
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{suffix}{n}")
    path.rename(aside)
