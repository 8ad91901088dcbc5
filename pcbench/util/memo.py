"""Facts about model shapes kept on disk, so that planning a grid (`run --dry-run`, the checks before
a run) needs neither torch nor transformers once they are known.

`remember(kind, key, compute)` returns `compute()`'s JSON value, kept under
`<cache>/facts/<kind>-<sha256>.json`. The key holds the versions of pcbench, torch and transformers
(read from the installed metadata, without importing them) and a hash of the pcbench code that
computes the facts (`CODE`): another version, or an edit of that code, computes afresh. Entries
are sealed (`util.verify.write_sealed_json`): a damaged one is named in one warning line, computed
again and rewritten, never read as facts; a cache that cannot be written is only skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Callable

_MEMORY: dict[str, Any] = {}
CODE = ("models.py", "spec/presets.py", "compress/axes.py", "compress/plan.py", "train/memory.py",
        "run/preflight.py", "util/memo.py")  # what computes the facts (relative to the package)


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    from importlib import metadata

    from pcbench import __version__

    from pathlib import Path

    import pcbench

    root = Path(pcbench.__file__).parent
    code = hashlib.sha256()
    for rel in CODE:
        try:
            code.update(rel.encode() + b"\0" + (root / rel).read_bytes())
        except OSError:
            code.update(rel.encode() + b"\0missing")
    out = {"pcbench": __version__, "code": code.hexdigest()[:16]}
    for dist in ("torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def remember(kind: str, key: Any, compute: Callable[[], Any]) -> Any:
    """`compute()` once per `key` (JSON-able) and installed versions, kept on disk (JSON values)."""
    from pcbench.util.paths import cache_dir
    from pcbench.util.verify import Damaged, Unsealed, read_sealed_json, warn, write_sealed_json

    blob = json.dumps({"kind": kind, "key": key, "versions": _versions()}, sort_keys=True, default=str)
    name = f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"
    if name in _MEMORY:
        return _MEMORY[name]
    try:
        path = cache_dir() / "facts" / f"{name}.json"
    except Exception:  # noqa: BLE001 - an unusable cache: compute without keeping
        path = None
    if path is not None:
        try:
            rec = read_sealed_json(path, "cached facts")
            if isinstance(rec, dict) and rec.get("key") == blob and "value" in rec:
                _MEMORY[name] = rec["value"]
                return rec["value"]
        except (FileNotFoundError, Unsealed):  # none yet, or an older pcbench's: computed again
            pass
        except Damaged as e:  # changed bytes are never read as facts: computed again, rewritten
            warn(f"{e}; computing it again")
        except OSError:
            pass
    value = compute()
    value = json.loads(json.dumps(value, default=str))  # as it reads back: lists, not tuples
    if path is not None:
        try:
            write_sealed_json(path, {"key": blob, "value": value})
        except OSError:
            pass
    _MEMORY[name] = value
    return value
