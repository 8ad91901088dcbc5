"""What pcbench owns on disk: every directory it writes as a unit is a *pcbench output* of a kind.

Kinds: `model` (an exported HF checkpoint: `train.export_model`, `pcbench compress --out`,
`pcbench export`), `report` (`paper_figures/<grid>/`), `results` (`<results>/<grid>/`), `work`
(`<work>/<grid>/`), `train` (`pcbench train --out`), `compress-work` (the scratch state of
`pcbench compress`, `<out>.pcbench/`) and `tasks` (the lm-eval suite, `pcbench tasks --out`).

An output carries a marker, `.pcbench.json` = {"kind", "files", "marker_sha256"} (`files`: the
relative paths pcbench wrote there, when it replaces them as a set; `marker_sha256`: the marker's
own seal, so a damaged marker is named as itself, not as a file it lists), or is recognisable
from what older versions wrote (a report's REPORT.md heading, a store's `runs/`, a suite's
`suite.json`).

The rule, for every command that writes: a target that does not exist or is an empty directory
may be written; a pcbench output of the same kind may be written into (its own files replaced,
anything else in it left alone); anything else is refused with one line (`OutputError`), before
any work starts. Nothing pcbench did not create is ever removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

from pcbench.util.errors import SpecError

MARKER = ".pcbench.json"
KINDS = ("model", "report", "results", "work", "train", "compress-work", "tasks")
HASHED = ("model",)  # kinds whose marker records the sha256 of every file (`verify_output`)
REWRITABLE = ("README.md",)  # files of a hashed output pcbench may rewrite later (the card: `record_rewrite`)
RESCORED = "rewritten"  # the marker key of their digests since
SEAL = "marker_sha256"  # the marker key of the sha256 of the marker itself (`verify_output` checks it)
_SUITE_FILE = re.compile(r"pcb_[a-z0-9_]+\.(?:jsonl|yaml)|pcbench_local\.yaml")
_RUN_ID = re.compile(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*-[0-9a-f]{10}")


class OutputError(SpecError):
    """A target pcbench may not write: a file where a directory is needed, or someone else's data."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_dir_path(path: str | os.PathLike, what: str) -> Path:
    """`path` is, or can be created as, a directory: no part of it is a file. Returns it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(what, f"{p} is a file, not a directory")
    for parent in Path(os.path.abspath(p)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(what, f"{parent} (in {p}) is a file, not a directory")
            break
    return p


def read_marker(d: str | os.PathLike) -> Optional[dict]:
    """The marker of output directory `d`, or None (missing or unreadable; `verify_output` names
    a damaged one)."""
    try:
        m = json.loads((Path(d) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("kind") in KINDS else None


def _seal(rec: dict) -> str:
    """The sha256 of a marker's content (all but its seal, canonical JSON)."""
    from pcbench.util.verify import sha256_json

    return sha256_json({k: v for k, v in rec.items() if k != SEAL})


def _write_sealed(d: str | os.PathLike, rec: dict) -> None:
    """Write marker `rec` into `d` atomically, sealed with its own sha256 (`SEAL`)."""
    from pcbench.util.atomic import write_json

    rec = {k: v for k, v in rec.items() if k != SEAL}
    write_json(Path(d) / MARKER, {**rec, SEAL: _seal(rec)})


def write_marker(d: str | os.PathLike, kind: str, files: Optional[list[str]] = None, **extra) -> None:
    """Mark `d` as a pcbench output of `kind` that holds `files` (relative paths)."""
    from pcbench import __version__

    assert kind in KINDS, kind
    rec = {"kind": kind, "pcbench": __version__, **extra}
    if files is not None:
        rec["files"] = sorted(files)
    _write_sealed(d, rec)


def _report_legacy_files(d: Path) -> Optional[list[str]]:
    """A report written before markers: REPORT.md with pcbench's heading. Its own files are
    REPORT.md, the tables and figures it links (and each linked table's CSV twin), runs.csv and
    paper_reference.csv."""
    try:
        text = (d / "REPORT.md").read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("# pcbench report:"):
        return None
    own = {"REPORT.md", "tables/runs.csv", "tables/paper_reference.csv"}
    for link in re.findall(r"\(((?:tables|figures)/[A-Za-z0-9_.-]+\.(?:md|csv|png))\)", text):
        own.add(link)
        if link.endswith(".md"):
            own.add(link[:-3] + ".csv")
    return sorted(f for f in own if (d / f).is_file())


def _legacy_kind(d: Path) -> Optional[str]:
    """The kind of an unmarked directory written by an older pcbench, or None."""
    names = {p.name for p in d.iterdir()}
    if _report_legacy_files(d) is not None:
        return "report"
    if (d / "suite.json").is_file():
        return "tasks"
    if ".lock" in names and all(n == ".lock" or _SUITE_FILE.fullmatch(n) for n in names):
        return "tasks"  # a suite an older pcbench was killed while writing in place (its lock inside)
    if (d / "runs").is_dir() or "events.jsonl" in names:
        return "results"
    visible = {n for n in names if not n.startswith(".")}
    if visible and visible <= {"record", "work", "model"}:
        return "train"
    if visible and visible <= {"record", "ckpt", "plan.json"}:
        return "compress-work"
    if visible and all(n == "logs" or (_RUN_ID.fullmatch(n) and (d / n).is_dir()) for n in visible):
        return "work"
    return None


def _marker_in_flight(name: str) -> bool:
    """A marker being written atomically (`atomic.temp_file` next to it), not a user's file."""
    return re.fullmatch(rf"\.{re.escape(MARKER)}\.[0-9a-f]{{12}}\.tmp", name) is not None


def kind_of(d: str | os.PathLike) -> Optional[str]:
    """The kind of pcbench output at `d`, "" for a missing or empty directory, None for anything else."""
    d = Path(d)
    if not d.exists():
        return ""
    if not d.is_dir():
        return None
    if all(_marker_in_flight(e.name) for e in d.iterdir()):  # empty, or another process marking it now
        return ""
    m = read_marker(d)
    return m["kind"] if m else _legacy_kind(d)


def own_files(d: str | os.PathLike) -> set[str]:
    """Relative paths of the files pcbench wrote as the set it replaces in `d`."""
    d = Path(d)
    m = read_marker(d)
    if m is not None:
        return set(m.get("files") or [])
    return set(_report_legacy_files(d) or [])


_NAMES = {"model": "a pcbench model", "report": "a pcbench report", "results": "a pcbench results store",
          "work": "a pcbench work directory", "train": "a `pcbench train` output",
          "compress-work": "`pcbench compress` state", "tasks": "a pcbench task suite"}


def claim(path: str | os.PathLike, kind: str, what: str, *, replace: bool = True) -> Path:
    """Check that a `kind` output may be written at `path` (see the module docstring); creates nothing.

    `replace=False`: an existing output of the same kind is refused too (a `--force` sets it)."""
    p = check_dir_path(path, what)
    have = kind_of(p)
    if have == "":
        return p
    if have == kind:
        if replace:
            return p
        raise OutputError(what, f"{p} already holds {_NAMES[kind]}; give --force to replace it "
                          "(only pcbench's own files there are replaced)")
    held = f"holds {_NAMES[have]}, not {_NAMES[kind]}" if have else \
        f"is not empty and is not {_NAMES[kind]} (pcbench never writes into other files)"
    raise OutputError(what, f"{p} {held}; choose another path")


def ensure_dir(path: str | os.PathLike, kind: str, what: str) -> Path:
    """Claim `path` for `kind`, create it, and mark it when pcbench created it or it was empty."""
    p = claim(path, kind, what)
    fresh = kind_of(p) == ""
    p.mkdir(parents=True, exist_ok=True)
    if fresh and read_marker(p) is None:
        write_marker(p, kind)
    return p


@contextlib.contextmanager
def staging(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh temp directory next to `target` (named by this process's host and pid), removed on the
    way out (whatever happens). The temp dirs of `target` that dead writers left are removed first;
    an OSError inside that names no file (a full disk) is raised again naming `target`."""
    from pcbench.util.atomic import naming, sweep_temps, temp_dir

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_temps(target)
    tmp = temp_dir(target)
    try:
        with naming(target):  # a full disk while writing names the output
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != MARKER)


def _fix_modes(d: Path) -> None:
    """Usual modes (umask applied): mkdtemp makes 0700 dirs, some writers 0600 files."""
    mask = _umask()
    for p in [d, *d.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def install(staged: Path, target: str | os.PathLike, kind: str, what: str, **extra) -> Path:
    """Put the finished output `staged` (a `staging` dir) at `target`, marked as `kind` (with
    `extra` fields in its marker), whole or not at all: a reader (or a process killed meanwhile)
    sees the old output or the new one. A `model` marker records the sha256 of every file
    (`sha256`), which `verify_output` checks whenever the model is read back.

    A missing or empty target is replaced by one rename. An output of the same kind is swapped
    with `staged` in one step (`atomic.replace_dir`), after the files in it that are not pcbench's
    own were carried over into `staged` as hard links (so they are never moved, and a writer killed
    before the swap leaves them where they were); pcbench's files that the new output lacks are
    gone with the old directory. (A target that is a symbolic link has its files replaced one
    rename each, the marker last.)"""
    target = Path(target)
    files = _files(staged)
    if kind in HASHED:
        from pcbench.util.verify import digest_files

        extra["sha256"] = digest_files(staged, files, cache=False)
    write_marker(staged, kind, files, **extra)
    _fix_modes(staged)
    have = claim(target, kind, what)  # checked again: the target may have changed meanwhile
    if kind_of(have) == "":
        if target.exists():
            target.rmdir()  # empty
        os.replace(staged, target)
        return target
    if target.is_symlink():
        return _install_files(staged, target, files, what)
    from pcbench.util.atomic import replace_dir

    _carry_over(target, staged, own_files(target) | set(files) | {MARKER}, what)
    shutil.copymode(target, staged)
    replace_dir(staged, target)
    return target


def _carry_over(target: Path, staged: Path, skip: set[str], what: str) -> None:
    """Link every file and directory of `target` whose relative path is not in `skip` into `staged`
    (a hard link; a copy where the file system refuses links; a symbolic link as itself)."""
    for dirpath, dirnames, filenames in os.walk(target):
        here = Path(dirpath)
        rel_dir = here.relative_to(target)
        for name in sorted(dirnames):
            src, rel = here / name, rel_dir / name
            dest = staged / rel
            if str(rel) in skip:
                raise OutputError(what, f"{target / rel} is a directory where pcbench writes a file")
            if src.is_symlink():
                os.symlink(os.readlink(src), dest)
                dirnames.remove(name)
                continue
            if dest.exists() and not dest.is_dir():
                raise OutputError(what, f"{src} is a directory where pcbench writes a file")
            dest.mkdir(exist_ok=True)
            shutil.copystat(src, dest)
        for name in filenames:
            rel = str(rel_dir / name) if str(rel_dir) != "." else name
            if rel in skip:
                continue
            src, dest = here / name, staged / rel
            if dest.is_dir():
                raise OutputError(what, f"{src} is a file where pcbench writes a directory")
            if src.is_symlink():
                os.symlink(os.readlink(src), dest)
                continue
            try:
                os.link(src, dest)
            except OSError:
                shutil.copy2(src, dest)


def _install_files(staged: Path, target: Path, files: list[str], what: str) -> Path:
    """Replace pcbench's own files in `target` one rename each (the marker last)."""
    old = own_files(target)
    for rel in files:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir():
            raise OutputError(what, f"{dest} is a directory where pcbench writes a file")
        os.replace(staged / rel, dest)
    for rel in sorted(old - set(files)):
        with contextlib.suppress(FileNotFoundError):
            (target / rel).unlink()
    os.replace(staged / MARKER, target / MARKER)
    return target


def _checked_marker(d: str | os.PathLike, what: str) -> Optional[dict]:
    """The marker of `d` (None: there is none), `verify.Damaged` naming the marker when it is not
    valid JSON, not a pcbench marker, or no longer matches its seal (markers written before seals:
    read as they are)."""
    from pcbench.util.verify import Damaged

    path = Path(d) / MARKER
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        m = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        raise Damaged(path, "not valid JSON", what) from None
    if not isinstance(m, dict) or m.get("kind") not in KINDS:
        raise Damaged(path, "not a pcbench marker", what)
    if SEAL in m and m[SEAL] != _seal(m):
        raise Damaged(path, "sha256 mismatch", what)
    return m


def verify_output(d: str | os.PathLike, what: str = "") -> Optional[dict]:
    """Check a pcbench output read back: its marker is intact (sealed) and every file it lists with
    a sha256 is too (`verify.Damaged` names the marker, or the first file, that is not). Returns the
    marker (None: no marker, nothing recorded to check against, e.g. a checkpoint pcbench did not
    write)."""
    from pcbench.util.verify import Damaged, verify_file

    m = _checked_marker(d, what)
    if m is not None and isinstance(m.get("sha256"), dict):
        later = m.get(RESCORED) if isinstance(m.get(RESCORED), dict) else {}
        for rel, digest in sorted(m["sha256"].items()):
            try:
                verify_file(Path(d) / rel, digest, what=what)
            except Damaged:
                if rel not in REWRITABLE or not isinstance(later.get(rel), str):
                    raise
                verify_file(Path(d) / rel, later[rel], what=what)  # as `record_rewrite` recorded it
    return m


def record_rewrite(d: str | os.PathLike, rel: str, digest: str) -> None:
    """Record that pcbench is about to rewrite `rel` (a `REWRITABLE` file: the model card, which
    `pcbench eval DIR` gives its scores) in the output `d` as bytes of sha256 `digest`. Called
    before the file is replaced, so a writer killed in between leaves a file that matches either
    digest. The written table (`sha256`, what a run's record names by `output_digest`) is kept,
    and the marker sealed again."""
    assert rel in REWRITABLE, rel
    m = read_marker(d)
    if m is None or rel not in (m.get("sha256") or {}):
        return
    later = dict(m.get(RESCORED) or {})
    later[rel] = digest
    _write_sealed(d, {**m, RESCORED: later})


def output_digest(marker: Optional[dict]) -> Optional[str]:
    """One digest for an output's recorded file table (what a record keeps to name its output)."""
    from pcbench.util.verify import sha256_json

    table = (marker or {}).get("sha256")
    return sha256_json(table) if isinstance(table, dict) else None
