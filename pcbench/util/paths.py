"""Where pcbench keeps things outside git: the download/token cache and the work directory.

A variable that names an unusable directory (a file, a path under a file, a directory that cannot
be created) is refused as `SpecError` naming the variable."""

from __future__ import annotations

import os
from pathlib import Path

from pcbench.util.errors import SpecError


def _dir_from(var: str, default: Path) -> Path:
    """The directory `$var` names (else `default`), created if missing."""
    given = os.environ.get(var) or None  # set but empty: as if unset
    root = Path(given).expanduser() if given else default
    what = f"{root}" if given else f"{root} (the default; set ${var} to choose another)"
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


def cache_dir() -> Path:
    """Root for fetched assets and token shards (`$PCBENCH_CACHE`, default `~/.cache/pcbench`)."""
    return _dir_from("PCBENCH_CACHE", Path.home() / ".cache" / "pcbench")


def work_dir() -> Path:
    """Root for checkpoints and exported weights (`$PCBENCH_WORK`, default `<cache>/work`)."""
    if os.environ.get("PCBENCH_WORK"):
        return _dir_from("PCBENCH_WORK", Path())
    return _dir_from("PCBENCH_WORK", cache_dir() / "work")
