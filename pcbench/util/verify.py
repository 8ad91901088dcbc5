"""The sha256 of what pcbench wrote, checked when it is read back: the one hashing helper.

Everything pcbench reads back that it wrote (token stores, the tokenizers it trains, exported
models, checkpoints, the task suite) carries the sha256 recorded when it was written; a reader
calls `verify_file` (or `verify_files` for a directory's table) before trusting the bytes, and a
mismatch raises `Damaged`, shown as one line: `... damaged: PATH (sha256 mismatch)`.

Cheap on the hot path: a file's digest is computed once per version of the file, where a version
is (device, inode, size, mtime_ns, ctime_ns): any write to the file (or `touch`, a rename, a
restored mtime) changes its ctime, so a cached digest never outlives the bytes it describes. The
digest is kept for this process (a dict) and for the next ones in a small verified-cache under
`cache_dir()/verified/` (one sealed JSON file per path, written atomically; an unreadable or
damaged entry is ignored; past `PRUNE_AT` entries, those of files gone are removed). A multi-GB
token store is hashed once, not once per run.

Small JSON files pcbench writes and reads back as data (cached facts, a run's kept indices) are
*sealed*: `write_sealed_json` stores the value with the sha256 of its canonical form and
`read_sealed_json` gives it back only when the two still agree, else `Damaged`.

May import: nothing of pcbench but `util` (a leaf room).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional

CHUNK = 1 << 20
_memo: dict[tuple, str] = {}
_said: set[str] = set()


class Damaged(RuntimeError):
    """A file pcbench wrote is not what it recorded: `WHAT damaged: PATH (WHY)`."""

    def __init__(self, path: str | os.PathLike, why: str = "sha256 mismatch", what: str = ""):
        self.path, self.why, self.what = Path(path), why, what
        super().__init__(f"{what + ' ' if what else ''}damaged: {path} ({why})")


class Unsealed(Damaged):
    """Valid JSON without a seal: written by an older pcbench (or by hand), so not to be trusted."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj) -> str:
    """The digest of a JSON-able value in canonical form (sorted keys, no spaces)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _version(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _entry(path: Path) -> Optional[Path]:
    """The verified-cache file of `path` (None when no cache dir can be had)."""
    try:
        from pcbench.util.paths import cache_dir

        root = cache_dir() / "verified"
    except OSError:
        return None
    return root / (sha256_bytes(str(path).encode("utf-8", "surrogateescape"))[:32] + ".json")


def _cached(path: Path, version: tuple) -> Optional[str]:
    key = (str(path), *version)
    if key in _memo:
        return _memo[key]
    entry = _entry(path)
    if entry is None:
        return None
    try:
        rec = read_sealed_json(entry)
    except (OSError, ValueError, Damaged):
        return None
    if isinstance(rec, dict) and rec.get("path") == str(path) and rec.get("version") == list(version) \
            and isinstance(rec.get("sha256"), str):
        _memo[key] = rec["sha256"]
        return rec["sha256"]
    return None


PRUNE_AT = 16384  # entries in the verified-cache before those of files gone are removed
_pruned = False


def prune(root: Path) -> int:
    """Remove the verified-cache entries of files that no longer exist (and unreadable ones); an
    entry per path is overwritten in place, so only the entries of removed files accumulate."""
    gone = 0
    for entry in root.glob("*.json"):
        try:
            rec = read_sealed_json(entry)
            keep = isinstance(rec, dict) and os.path.exists(rec.get("path", ""))
        except (OSError, Damaged, TypeError):
            keep = False
        if not keep:
            try:
                entry.unlink()
                gone += 1
            except OSError:
                pass
    return gone


def _remember(path: Path, version: tuple, digest: str) -> None:
    global _pruned
    _memo[(str(path), *version)] = digest
    entry = _entry(path)
    if entry is None:
        return
    try:
        write_sealed_json(entry, {"path": str(path), "version": list(version), "sha256": digest})
        if not _pruned:  # once per process, and only past PRUNE_AT entries
            _pruned = True
            with os.scandir(entry.parent) as it:
                if sum(1 for _ in it) > PRUNE_AT:
                    prune(entry.parent)
    except OSError:
        pass  # a read-only cache: this process still remembers


def sha256_file(path: str | os.PathLike, *, cache: bool = True) -> str:
    """The sha256 of the file at `path` (hashed once per version of the file, see the module)."""
    path = Path(os.path.abspath(path))
    st = path.stat()
    version = _version(st)
    if cache:
        hit = _cached(path, version)
        if hit is not None:
            return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if cache and _version(path.stat()) == version:  # unchanged while we read it
        _remember(path, version, digest)
    return digest


def record_digest(path: str | os.PathLike, sha256: str) -> None:
    """Remember `sha256` (computed from the bytes as they were written) for the file now at `path`."""
    path = Path(os.path.abspath(path))
    _remember(path, _version(path.stat()), sha256)


def hashed_as_is(path: str | os.PathLike) -> bool:
    """Whether this version of the file at `path` was hashed here before (this process, or an entry
    of the verified-cache): a reader that finds it was not must hash it (`verify_file`), as the
    stage that should have (e.g. `pcbench prepare`) may not have run, or its entries were cleared."""
    path = Path(os.path.abspath(path))
    try:
        return _cached(path, _version(path.stat())) is not None
    except OSError:
        return False


def verify_file(path: str | os.PathLike, sha256: str, *, size: Optional[int] = None, what: str = "",
                cache: bool = True) -> None:
    """Raise `Damaged` unless the file at `path` has the recorded `sha256` (and `size`, if given)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise Damaged(p, "missing", what) from None
    if not p.is_file():
        raise Damaged(p, "not a file", what)
    if size is not None and st.st_size != size:
        raise Damaged(p, f"{st.st_size} bytes, recorded {size}: truncated or extended", what)
    if sha256_file(p, cache=cache) != sha256:
        raise Damaged(p, "sha256 mismatch", what)


def digest_files(root: str | os.PathLike, rels: Iterable[str], *, cache: bool = True) -> dict[str, str]:
    """{relative path: sha256} of files under `root` (`cache=False`: files about to move)."""
    root = Path(root)
    return {rel: sha256_file(root / rel, cache=cache) for rel in sorted(rels)}


def verify_files(root: str | os.PathLike, table: Mapping[str, str], *, what: str = "") -> None:
    """Every file of `table` ({relative path: sha256}) under `root` is intact, else `Damaged`."""
    root = Path(root)
    for rel, digest in sorted(table.items()):
        verify_file(root / rel, digest, what=what)


SEAL = "sha256"  # the key of a sealed JSON file's digest, beside "value"


def write_sealed_json(path: str | os.PathLike, value) -> None:
    """Write `value` (JSON-able) atomically with the sha256 of its canonical form."""
    from pcbench.util.atomic import write_text

    value = json.loads(json.dumps(value, default=str))  # as it will read back (lists, str keys)
    write_text(path, json.dumps({SEAL: sha256_json(value), "value": value}, sort_keys=True) + "\n")


def read_sealed_json(path: str | os.PathLike, what: str = ""):
    """The value `write_sealed_json` wrote at `path`; `Damaged` when it is not valid JSON, not sealed
    (e.g. written by an older pcbench) or no longer matches its seal. OSError when unreadable."""
    data = Path(path).read_bytes()
    try:
        rec = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        raise Damaged(path, "not valid JSON", what) from None
    if not isinstance(rec, dict) or set(rec) != {SEAL, "value"}:
        raise Unsealed(path, "not a sealed record", what)
    if rec[SEAL] != sha256_json(rec["value"]):
        raise Damaged(path, "sha256 mismatch", what)
    return rec["value"]


def warn(message: str) -> None:
    """One warning line on stderr (`pcbench: warning: ...`), once per message in this process."""
    if message not in _said:
        _said.add(message)
        print(f"pcbench: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)
