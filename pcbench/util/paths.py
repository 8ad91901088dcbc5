"""Where pcbench keeps things outside git: the download/token cache and the work directory.

The cache is created when asked for (nearly every command writes there), and checked first by the
commands that use it (`check_cache`, before any output); the work directory only when something is
written into it (`outputs.ensure_dir`), so a dry run leaves none behind.

A variable that names an unusable directory (a file, a path under a file, a directory that cannot
be created) is refused as `SpecError` naming the variable."""

from __future__ import annotations

import os
from pathlib import Path

from pcbench.util.errors import SpecError


def _dir_from(var: str, default: Path, create: bool = True) -> Path:
    """The directory `$var` names (else `default`), created if missing (`create=False`: only
    checked that it could be, for a root its writers create when they first write there)."""
    given = os.environ.get(var) or None  # set but empty: as if unset
    root = Path(given).expanduser() if given else default
    what = f"{root}" if given else f"{root} (the default; set ${var} to choose another)"
    if not create and not root.exists():
        _creatable(root, var, what)
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SpecError(var, f"{what} is a file, not a directory") from None
    except NotADirectoryError:
        raise SpecError(var, f"{what} lies under a file, not a directory") from None
    except OSError as e:
        raise SpecError(var, f"{what} cannot be created ({e.strerror or e})") from None
    if not root.is_dir():
        raise SpecError(var, f"{what} is not a directory")
    return root


def _creatable(root: Path, var: str, what: str) -> None:
    """`root` (missing, not a dangling link) could be created: its nearest existing ancestor is a
    writable directory."""
    if root.is_symlink():
        raise SpecError(var, f"{what} is a link to nothing, not a directory")
    above = next(p for p in Path(os.path.abspath(root)).parents if p.exists())
    if not above.is_dir():
        raise SpecError(var, f"{what} lies under a file, not a directory")
    if not os.access(above, os.W_OK | os.X_OK):
        raise SpecError(var, f"{what} cannot be created (Permission denied: {above})")


def cache_dir() -> Path:
    """Root for fetched assets and token shards (`$PCBENCH_CACHE`, default `~/.cache/pcbench`)."""
    return _dir_from("PCBENCH_CACHE", Path.home() / ".cache" / "pcbench")


def check_cache() -> Path:
    """`cache_dir()` checked, not created: a command that will use the cache calls it before it
    creates any output (a `$PCBENCH_CACHE` naming a file is refused first, by a dry run too)."""
    return _dir_from("PCBENCH_CACHE", Path.home() / ".cache" / "pcbench", create=False)


def work_dir() -> Path:
    """Root for checkpoints and exported weights (`$PCBENCH_WORK`, default `<cache>/work`): checked,
    not created (a dry run writes nothing there; the work directory's writers create it)."""
    if os.environ.get("PCBENCH_WORK"):
        return _dir_from("PCBENCH_WORK", Path(), create=False)
    return _dir_from("PCBENCH_WORK", cache_dir() / "work", create=False)
