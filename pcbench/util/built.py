"""Directories pcbench builds once into its cache (tokenizers, extracted assets, converted models)
and trusts only while they hold what it wrote.

`ensure(out, build, what=...)` returns `out`, built by `build(tmp)` under a lock into a temp dir
that is swapped in whole, with the sha256 of every file it wrote recorded in `out/sha256.json`.
Every later use checks the files against that table (`util.verify`: hashed once per version of a
file, so a use costs a stat per file); a damaged directory is named in one warning line, set
aside and built again. One without its table (an older pcbench's, or the table lost) is never
trusted as it is: whatever its files hold, it is named in one warning line (when its `legacy` file
shows it was one of these directories) and built again.

May import: nothing of pcbench but `util` (a leaf room).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from pcbench.util.atomic import file_lock, read_json, replace_dir, sweep_temps, temp_dir, write_json
from pcbench.util.verify import Damaged, sha256_file, verify_files, warn

SUMS = "sha256.json"  # {relative path: sha256} of what `build` wrote


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p != root / SUMS)


def record(root: Path, files: Optional[tuple[str, ...]] = None) -> dict[str, str]:
    """Write `root/SUMS` for `files` (default: every file under `root`)."""
    sums = {f: sha256_file(root / f, cache=False) for f in (files or _files(root))}
    write_json(root / SUMS, sums)
    return sums


def check(out: Path, what: str, files: Optional[tuple[str, ...]] = None) -> Path:
    """`out` when every file of its table is intact (and the table names exactly `files`, if
    given), else `Damaged` (no table included: nothing says what its files should hold)."""
    try:
        sums = read_json(out / SUMS)
    except FileNotFoundError:
        raise Damaged(out / SUMS, "missing: its files cannot be checked", what) from None
    except (OSError, ValueError):
        raise Damaged(out / SUMS, "unreadable", what) from None
    if not isinstance(sums, dict) or not sums or (files is not None and set(sums) != set(files)) \
            or not all(isinstance(v, str) for v in sums.values()):
        raise Damaged(out / SUMS, "not the files written", what)
    verify_files(out, sums, what=what)
    return out


def ensure(out: Path, build: Callable[[Path], None], *, what: str, lock: Path,
           files: Optional[tuple[str, ...]] = None, legacy: Optional[str] = None) -> Path:
    """The directory `out`, built once by `build(tmp)` (under `lock`, swapped in whole) and checked
    on every use; a damaged one, or one without its table whose `legacy` file is there (an older
    pcbench's), is named in one warning line and built again."""
    present = (out / SUMS).exists() or (legacy is not None and (out / legacy).exists())
    if present:
        try:
            return check(out, what, files)
        except Damaged as e:
            warn(f"{e}; rebuilding it")
    with file_lock(lock):
        if (out / SUMS).exists():
            try:
                return check(out, what, files)  # intact, or rebuilt by another process meanwhile
            except Damaged:
                pass
        if out.exists():  # damaged or incomplete: pcbench's own cache entry, set aside and removed
            aside = out.with_name(f".{out.name}.damaged-{os.getpid()}-{time.time_ns()}")
            os.rename(out, aside)
            shutil.rmtree(aside, ignore_errors=True)
        sweep_temps(out)  # a dead writer's
        tmp = temp_dir(out)
        try:
            build(tmp)
            record(tmp, files)
            tmp.chmod(0o755)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
