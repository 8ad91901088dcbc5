"""Sharded token stores: built by the prepare stage, only read by training.

A store is one corpus split tokenised with one tokenizer, under `cache_dir()/stores/<name>/`:

    shards/00003.bin    the tokens of source-file group 3 (raw uint16/uint32, eos after each document)
    shards/00003.idx    its document ends (int64, cumulative, little-endian)
    shards/00003.json   counts, sha256 of .bin and .idx, the source files (written last: the shard exists)
    manifest.sealed.json  the ordered shards, counts, source files, tokenizer fingerprint (written last
                        of all: the store is complete only with it), sealed with its sha256
                        (`util.verify.write_sealed_json`): a damaged one is named and never read as
                        data, and the prepare stage writes it again (an older pcbench's, unsealed,
                        quietly) from the shards it checks

The token stream a trainer sees is the shards' tokens concatenated in group order: the documents
of `corpora.iter_documents` in the order it yields them, each followed by eos, exactly what the
one-process `tokens.prepare_tokens` writes. Groups are fixed by the corpus's source files alone
(`groups`), never by the number of workers, so the stream and every shard's bytes are the same
whatever the workers, the executor or the interruptions. A store of a streamed corpus holds a
prefix of the stream (the groups that cover the tokens its runs need); a later, larger need adds
groups behind it, and every prefix stays what it was. A run reads its own prefix (`open_store`).

`prepare_store` (the prepare stage) builds the shards a store lacks with a pool of worker processes
(forked from a fork server that imported their modules once; one tokenizer thread each), one group
per task; a shard whose files are missing or whose sha256 does not match is named and
redone, the others are kept. `build_shard` is one task (a SLURM array task runs it too) and
`finalize` writes the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from pcbench import __version__
from pcbench.data import corpora
from pcbench.util.atomic import read_json, write_bytes, write_json
from pcbench.util.errors import SpecError
from pcbench.util.paths import cache_dir
from pcbench.util.verify import (Damaged, Unsealed, hashed_as_is, read_sealed_json, record_digest, sha256_file,
                                 verify_file, warn, write_sealed_json)

FORMAT = "pcbench-shards/1"
# The manifest, sealed (`verify.write_sealed_json`). Not `manifest.json`, which an older pcbench writes
# unsealed: two versions sharing one cache each keep their own instead of rewriting the other's.
MANIFEST = "manifest.sealed.json"
DOCS_PER_CALL = 1000  # documents per encode_batch call (as tokens.prepare_tokens)
PACKAGED_FILES_PER_GROUP = 4  # packaged corpora: books or addresses per shard; streamed: one file
DOWNLOAD_RETRIES = 8
ONE_CORE_ENV = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def default_workers() -> int:
    """The CPUs this process may use (not the node's: on SLURM a job sees only its own)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Identity and layout


@dataclass(frozen=True)
class StoreRef:
    """Which store: a corpus split, a tokenizer (and the corpus a bpe-<N> was trained on)."""

    corpus: str
    tokenizer: str
    split: str
    tokenizer_corpus: str = "books"

    def tok_label(self) -> str:
        """The tokenizer's name, or `model` for a checkpoint's own (a directory or a hub id: the
        store is named by its fingerprint, so the same tokenizer by path or by id is one store)."""
        t = self.tokenizer
        return t if t in ("gpt2", "llama3") or re.fullmatch(r"bpe-\d+", t) else "model"

    def label(self) -> str:
        return f"{self.corpus}/{self.split}/{self.tok_label()}"


def load_tok(ref: StoreRef, offline: bool = True):
    """The store's tokenizer; a hub id is read from the HF cache only, unless `offline` is False
    (the prepare stage, which fetches it there)."""
    from pcbench.data.tokenizer import load_tokenizer

    t = ref.tokenizer
    if ref.tok_label() == "model" and not Path(t).is_dir() and re.fullmatch(r"[\w.-]+/[\w.-]+", t):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(t, local_files_only=offline)
        except OSError as e:
            raise SpecError("data.tokenizer", f"the tokenizer of {t} is not in the HF cache"
                            + (": run `pcbench prepare GRID` (it fetches it)" if offline else f": {e}")) from None
    return load_tokenizer(t, corpus=ref.tokenizer_corpus)


def identity(ref: StoreRef, tok=None) -> tuple[str, dict]:
    """(directory name, identity): corpus inputs + tokenizer fingerprint (never the size). For a
    tokenizer named by pcbench (gpt2, llama3, bpe-<N>) it is kept on disk (`util.memo`), so that a
    dry run that knows it loads no tokenizer (and imports neither torch nor transformers)."""
    if tok is None and ref.tok_label() != "model":
        from importlib import metadata

        from pcbench.util.memo import remember

        code = hashlib.sha256((Path(__file__).parent / "tokenizer.py").read_bytes()).hexdigest()[:16]
        key = [dataclasses.asdict(ref), corpora.fingerprint(ref.corpus, ref.split), code,
               metadata.version("tokenizers")]
        name, ident = remember("store-identity", key, lambda: list(_identity(ref, None)))
        return name, ident
    return _identity(ref, tok)


def _identity(ref: StoreRef, tok=None) -> tuple[str, dict]:
    from pcbench.data.tokenizer import fingerprint

    tok = tok if tok is not None else load_tok(ref)
    ident = {"format": FORMAT, "corpus": ref.corpus, "split": ref.split,
             "inputs_sha256": corpora.fingerprint(ref.corpus, ref.split),
             "tokenizer_sha256": fingerprint(tok), "files_per_group": _files_per_group(ref.corpus)}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    # Named by what decides its bytes only: one tokenizer by name (bpe-512) or by a checkpoint's
    # directory (model) is one store.
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{ref.corpus}-{ref.split}")[:80]
    return f"{name}-{digest}", ident


def stores_root() -> Path:
    return cache_dir() / "stores"


def _files_per_group(corpus: str) -> int:
    return 1 if corpora.is_streaming(corpus) else PACKAGED_FILES_PER_GROUP


def groups(ref: StoreRef) -> list[list[corpora.SourceFile]]:
    """The source files of the store in stream order, cut into the fixed groups shards are made of."""
    files = corpora.source_files(ref.corpus, ref.split)
    if not files:
        raise SpecError("data", f"corpus {ref.corpus!r} split {ref.split!r} has no source files")
    k = _files_per_group(ref.corpus)
    return [files[i: i + k] for i in range(0, len(files), k)]


def _shard(root: Path, i: int) -> tuple[Path, Path, Path]:
    base = root / "shards" / f"{i:05d}"
    return base.with_suffix(".bin"), base.with_suffix(".idx"), base.with_suffix(".json")


def check_shard(root: Path, i: int, files: Optional[list] = None) -> tuple[Optional[dict], str]:
    """(the shard's record, "") when shard `i` is whole, else (None, why: missing or damaged)."""
    bin_, idx, rec_path = _shard(root, i)
    if not rec_path.is_file():
        return None, "missing"
    try:
        rec = read_json(rec_path)
        if files is not None and rec.get("files") != [f.key for f in files]:
            return None, "damaged: made from other source files"
        if not bin_.is_file() or bin_.stat().st_size != rec["n_tokens"] * np.dtype(rec["dtype"]).itemsize:
            return None, f"damaged: {bin_} (missing or of the wrong size)"
        if not idx.is_file() or idx.stat().st_size != rec["n_documents"] * 8:
            return None, f"damaged: {idx} (missing or of the wrong size)"
        for f, want in ((bin_, rec["sha256"]), (idx, rec["idx_sha256"])):
            if sha256_file(f) != want:
                return None, f"damaged: {f} (sha256 mismatch)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"damaged: {rec_path} (unreadable: {e})"
    return rec, ""


# ---------------------------------------------------------------------------------------------
# One task: a group of source files -> one shard


def _fetch_remote(files: list[corpora.SourceFile]) -> dict:
    """Local copies of the group's remote files: one download each through `datasets`' download
    manager (its cache, retries with backoff); after the last retry, one line naming the file."""
    remote = [f.path for f in files if re.match(r"^[a-z0-9]+://", f.path)]
    if not remote:
        return {}
    from datasets import DownloadConfig, DownloadManager

    dm = DownloadManager(download_config=DownloadConfig(max_retries=DOWNLOAD_RETRIES))
    out = {}
    for url in remote:
        try:
            out[url] = dm.download(url)
        except Exception as e:  # noqa: BLE001 - the hub's errors are many; one line each
            raise RuntimeError(f"could not fetch {url} after {DOWNLOAD_RETRIES} retries: "
                               f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    return out


def build_shard(ref: StoreRef, root: Path, i: int, files: list[corpora.SourceFile], *,
                tok=None, hook: Optional[Callable[[int, int], None]] = None) -> dict:
    """Tokenise group `i` (`files`) into shard `i` of the store at `root`, atomically: the .bin
    and .idx are renamed into place, then the .json that says the shard exists. Returns its record.
    `hook(i, tokens_so_far)` is called after each batch of documents (tests: to interrupt)."""
    tok = tok if tok is not None else load_tok(ref)
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    vocab, eos = len(tok), tok.eos_token_id
    if eos is None:
        raise SpecError("data.tokenizer", f"tokenizer {ref.tokenizer!r} has no eos token")
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    bin_, idx, rec_path = _shard(root, i)
    bin_.parent.mkdir(parents=True, exist_ok=True)
    rec_path.unlink(missing_ok=True)  # a redone shard does not exist until its record is back
    _sweep_leftovers(bin_, idx)
    local = _fetch_remote(files)
    t0 = time.time()
    tmp_bin = bin_.with_name(f".{bin_.name}.tmp-{os.getpid()}")
    tmp_idx = idx.with_name(f".{idx.name}.tmp-{os.getpid()}")
    h_bin, h_idx = hashlib.sha256(), hashlib.sha256()
    n_tokens = n_docs = 0
    try:
        with open(tmp_bin, "wb") as fb, open(tmp_idx, "wb") as fi:
            docs = corpora.iter_file_documents(ref.corpus, ref.split, files, local=local)
            for chunk in corpora.batched(docs, DOCS_PER_CALL):
                arr, lens = _ids_with_eos(encode(chunk, add_special_tokens=False), eos)
                if len(arr) and int(arr.max()) >= vocab:
                    raise ValueError(f"token id {int(arr.max())} >= vocabulary {vocab}")
                b = arr.astype(dtype).tobytes()
                ends = (n_tokens + np.cumsum(lens)).astype("<i8").tobytes()
                fb.write(b)
                fi.write(ends)
                h_bin.update(b)
                h_idx.update(ends)
                n_tokens += len(arr)
                n_docs += len(chunk)
                if hook is not None:
                    hook(i, n_tokens)
            for f in (fb, fi):
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_bin, bin_)
        os.replace(tmp_idx, idx)
    except BaseException:
        for p in (tmp_bin, tmp_idx):
            p.unlink(missing_ok=True)
        raise
    rec = {"shard": i, "files": [f.key for f in files], "sources": [_stamp(f) for f in files],
           "n_tokens": n_tokens, "n_documents": n_docs, "dtype": dtype.name, "sha256": h_bin.hexdigest(),
           "idx_sha256": h_idx.hexdigest(), "seconds": round(time.time() - t0, 3)}
    record_digest(bin_, rec["sha256"])  # readers re-hash it only once it changes (`hashed_as_is`)
    record_digest(idx, rec["idx_sha256"])
    write_json(rec_path, rec)
    return rec


def _ids_with_eos(encs: list, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' ids, each followed by eos, as one int64 array; each document's length).
    One list is grown in C (`+=`) and converted once: no per-document numpy slice."""
    ids: list[int] = []
    lens: list[int] = []
    for e in encs:
        x = e.ids
        ids += x
        ids.append(eos)
        lens.append(len(x) + 1)
    return np.array(ids, dtype=np.int64), np.array(lens, dtype=np.int64)


def _sweep_leftovers(*paths: Path) -> None:
    """Remove the temporary files of these shard files that a killed task left (its pid is gone)."""
    for p in paths:
        for tmp in p.parent.glob(f".{p.name}.tmp-*"):
            pid = tmp.name.rpartition("-")[2]
            try:
                if pid.isdigit() and int(pid) != os.getpid():
                    os.kill(int(pid), 0)
                    continue  # alive: another prepare is writing it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            tmp.unlink(missing_ok=True)


def _stamp(f: corpora.SourceFile) -> dict:
    try:
        return f.stamp()
    except OSError:
        return {"file": f.path}


# ---------------------------------------------------------------------------------------------
# The manifest


def finalize(ref: StoreRef, root: Path, ident: dict, tok, records: dict[int, dict], n_groups: int,
             need: Optional[int]) -> dict:
    """Write the manifest over the shortest run of shards 0.. that holds `need` tokens (all of
    them when `need` is None or the corpus has no more). Rewritten only when it changes."""
    from pcbench.data.tokenizer import fingerprint

    shards, total = [], 0
    for i in range(n_groups):
        if need is not None and total >= need:
            break
        if i not in records:
            raise RuntimeError(f"{ref.label()}: shard {i} is not built")
        shards.append(records[i])
        total += records[i]["n_tokens"]
    if total == 0:
        raise SpecError("data", f"corpus {ref.corpus!r} split {ref.split!r} has no documents")
    vocab = len(tok)
    manifest = {**ident, "tokenizer": ref.tokenizer, "tokenizer_corpus": ref.tokenizer_corpus,
                "tokenizer_sha256": fingerprint(tok), "vocab_size": vocab, "eos_token_id": tok.eos_token_id,
                "dtype": np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32).name,
                "n_tokens": total, "n_documents": sum(s["n_documents"] for s in shards),
                "complete": len(shards) == n_groups, "n_groups": n_groups,
                "shards": [{k: s[k] for k in ("shard", "files", "sources", "n_tokens", "n_documents", "sha256",
                                              "idx_sha256")} for s in shards]}
    path = root / MANIFEST
    try:
        old = _read_manifest(path)
    except Unsealed:  # an older pcbench's: sealed now
        old = None
    except Damaged as e:
        warn(f"{e}; rebuilding it")
        old = None
    if old is None or {k: v for k, v in old.items() if k != "pcbench_version"} != manifest:
        write_sealed_json(path, {**manifest, "pcbench_version": __version__})
    return manifest


def _read_manifest(path: Path) -> Optional[dict]:
    """The store's manifest, None when there is none; `Damaged` when it does not match its seal, is
    not a manifest of this format, or is unsealed (`Unsealed`: an older pcbench's, never trusted as
    data: the prepare stage seals it again from the shards it checks)."""
    try:
        m = read_sealed_json(path, what="token store manifest")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Damaged(path, f"unreadable: {e.strerror or e}", "token store manifest") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise Damaged(path, f"not a {FORMAT} manifest", "token store manifest")
    return m


# ---------------------------------------------------------------------------------------------
# The prepare stage, locally: a pool of worker processes


# What a terminal sends its foreground process group (Ctrl-C, Ctrl-\\, a closed terminal): the
# launcher's to handle, blocked in the prepare workers' fork server (`_worker_context`).
TERMINAL_SIGNALS = {signal.SIGINT, signal.SIGQUIT, signal.SIGHUP}
# What a worker imports, once, in the fork server it is forked from (not once per worker).
WORKER_PRELOAD = ["pcbench.data.shards", "pcbench.data.corpora", "numpy", "tokenizers", "pyarrow.parquet"]


def _worker_context():
    """The start method of the prepare workers: forks of a fork server that imported
    `WORKER_PRELOAD` (a fresh process, not this one: safe whatever this process has imported or
    started, torch and tokenizers' thread pool included); started here, so that its imports run
    while this process loads the tokenizer. `spawn` where there is no fork server (not POSIX).

    The server, the workers forked from it and multiprocessing's resource tracker start with
    `TERMINAL_SIGNALS` blocked: the server ignores SIGINT only once its imports are done, so a
    Ctrl-C during them printed a KeyboardInterrupt traceback and broke the pool, and the tracker
    ignores SIGINT and SIGTERM only (Ctrl-\\ or a closed terminal killed it: a traceback later).
    This process handles those signals and stops the workers; a worker also ends with it."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    from multiprocessing import resource_tracker

    with _blocked_in_children(TERMINAL_SIGNALS):  # the server and its resource tracker
        resource_tracker.ensure_running()  # (it unblocks SIGINT and SIGTERM here once started)
        signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
        forkserver.ensure_running()  # returns at once; a server started earlier is reused
    return ctx


@contextlib.contextmanager
def _blocked_in_children(signals: set) -> Iterator[None]:
    """Within: a process started (fork and exec) has `signals` blocked from its first instruction
    (the signal mask is inherited, and kept across exec), so none can stop it before it ignores
    them itself. This process loses none: only this thread blocks them meanwhile, and one sent
    to it then is delivered on the way out (or to another thread, to the same handler)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _worker_init(env: dict, launcher: int) -> None:
    """A worker's environment: this call's (the fork server's is that of its start), one core; it
    ends when the launching process `launcher` does (its parent is the fork server, which outlives
    it: without this a killed prepare leaves its workers, and so the server, idle for good), and
    leaves Ctrl-C to the launcher (a terminal's reaches the whole process group)."""
    import signal
    import threading

    os.environ.clear()
    os.environ.update(env)
    os.environ.update(ONE_CORE_ENV)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(launcher,), name="pcbench-launcher-watch", daemon=True).start()


def _end_with(pid: int, poll: float = 0.5) -> None:
    """Exit this process as soon as process `pid` has ended (a pidfd where Linux has one, else a poll)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or already gone
        fd = None
    if fd is not None:
        import select

        select.select([fd], [], [])  # readable once the process has exited
    else:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(poll)
    os._exit(1)  # a half-written shard's temporary files are swept by the next writer


class WorkerDied(ChildProcessError):
    """A prepare worker ended without its result (killed, out of memory): an environment error,
    shown as one line (an OSError with its reason as `strerror`)."""

    def __init__(self, message: str):
        import errno

        super().__init__(errno.ECHILD, message)

    def __str__(self) -> str:
        return self.strerror


class Stopped(BaseException):
    """SIGTERM/SIGHUP/SIGQUIT/SIGINT reached a prepare whose caller handles none of them."""

    def __init__(self, signum: int):
        import signal

        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


_WORKER_TOK: dict = {}


class _BareTok:
    """What `build_shard` uses of a tokenizer, from its backend's JSON: a worker needs `tokenizers`
    only (not transformers); built once per worker (0.1 s)."""

    def __init__(self, backend_json: str, eos: int, vocab: int):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_str(backend_json)
        self.eos_token_id, self._vocab = eos, vocab

    def __len__(self) -> int:
        return self._vocab


def _task(ref: StoreRef, root: str, i: int, files: list, verify: bool, tok_state: tuple) -> tuple[int, dict, str]:
    """Pool task: (i, record, what happened: kept | built | redone (why))."""
    root_p = Path(root)
    why = "missing"
    if verify:
        rec, why = check_shard(root_p, i, files)
        if rec is not None:
            return i, rec, "kept"
    if ref not in _WORKER_TOK:
        _WORKER_TOK.clear()
        _WORKER_TOK[ref] = _BareTok(*tok_state)
    hook = None
    kill = os.environ.get("PCBENCH_TEST_KILL_SHARD")  # tests: SIGKILL this worker inside shard N
    hold = os.environ.get("PCBENCH_TEST_HOLD_SHARD")  # tests: this worker stops inside shard N
    if kill is not None and int(kill) == i:
        import signal

        def hook(_i, n):  # noqa: F811
            if n > 0:
                os.kill(os.getpid(), signal.SIGKILL)
    elif hold is not None and int(hold) == i:
        def hook(_i, n):  # noqa: F811
            time.sleep(300)
    rec = build_shard(ref, root_p, i, files, tok=_WORKER_TOK[ref], hook=hook)
    return i, rec, "built" if why == "missing" else f"redone ({why})"


@dataclass
class Prepared:
    """What `prepare_store` did: the manifest, and which shards it built, redid or kept."""

    ref: StoreRef
    path: Path
    manifest: dict
    built: list
    redone: list
    kept: list
    seconds: float


def prepare_store(ref: StoreRef, *, need: Optional[int] = None, workers: Optional[int] = None,
                  log: Optional[Callable[[str], None]] = None) -> Prepared:
    """Build what the store lacks so that it holds `need` tokens (None: the whole split), with
    `workers` processes (default `default_workers()`), and write its manifest. Every shard it
    uses is checked against its sha256 first: a damaged one is named and redone. A worker that
    dies is `WorkerDied` (one line); SIGINT/SIGTERM/SIGHUP/SIGQUIT, where the caller handles none of them
    (`pcbench prepare`), end the workers and the process with one line and exit 128+signal."""
    try:
        with _stoppable():
            return _prepare_store(ref, need, workers, log)
    except Stopped as e:
        print(f"pcbench: interrupted by {e.name}: token store {ref.label()}: the shards it finished are kept; "
              "run the same command again to go on", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None


def _stoppable():
    """Within: SIGINT, SIGTERM, SIGHUP and SIGQUIT raise `Stopped`, each only where its handler is Python's
    default (a caller that handles one, as `pcbench run` does, keeps it); the old ones come back."""
    import contextlib
    import signal
    import threading

    def stop(signum, frame):
        raise Stopped(signum)

    @contextlib.contextmanager
    def ctx():
        old = {}
        if threading.current_thread() is threading.main_thread():
            for s, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                               (signal.SIGHUP, signal.SIG_DFL), (signal.SIGQUIT, signal.SIG_DFL)):
                if signal.getsignal(s) is default:
                    old[s] = signal.signal(s, stop)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    return ctx()


def _stop_workers(pool) -> None:
    """End a pool's workers now (not after their shards: an interrupted or failed prepare)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        try:
            proc.kill()
        except (OSError, ValueError):
            pass
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.join(timeout=5)


def _prepare_store(ref: StoreRef, need: Optional[int], workers: Optional[int],
                   log: Optional[Callable[[str], None]]) -> Prepared:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    t0 = time.time()
    log = log or (lambda m: print(f"[pcbench] {m}", file=sys.stderr, flush=True))
    corpora.check_split(ref.corpus, ref.split)
    if need is None and corpora.is_streaming(ref.corpus):
        raise SpecError("data", f"corpus {ref.corpus!r} is streamed: say how many tokens its store needs")
    ctx = _worker_context()
    tok = load_tok(ref, offline=False)  # here first: a bpe-<N> is trained (or copied) once, a hub one fetched
    name, ident = identity(ref, tok)
    root = stores_root() / name
    root.mkdir(parents=True, exist_ok=True)
    plan = groups(ref)
    workers = max(1, workers or default_workers())
    tok_state = (tok.backend_tokenizer.to_str(), tok.eos_token_id, len(tok))
    if tok_state[1] is None:
        raise SpecError("data.tokenizer", f"tokenizer {ref.tokenizer!r} has no eos token")
    records: dict[int, dict] = {}
    built, redone, kept = [], [], []

    def covered() -> bool:  # the done shards 0.. hold `need`
        total = 0
        for i in range(len(plan)):
            if i not in records:
                return False
            total += records[i]["n_tokens"]
            if need is not None and total >= need:
                return True
        return True

    saved = {k: os.environ.get(k) for k in ONE_CORE_ENV}
    os.environ.update(ONE_CORE_ENV)  # the workers' tokenizer pools: one thread each
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(dict(os.environ), os.getpid()))
    try:
        pending, nxt = set(), 0
        while True:
            while nxt < len(plan) and len(pending) < workers and not covered():
                pending.add(pool.submit(_task, ref, str(root), nxt, plan[nxt], True, tok_state))
                nxt += 1
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    i, rec, what = fut.result()
                except BrokenProcessPool:
                    raise WorkerDied(f"token store {ref.label()} ({root}): a prepare worker died (killed, out of "
                                     "memory, or, called from a script of your own, that script ran again in the "
                                     "worker: call it under `if __name__ == '__main__':`); the shards finished "
                                     "are kept: run the same command again to go on") from None
                records[i] = rec
                (kept if what == "kept" else built if what == "built" else redone).append(i)
                if what.startswith("redone"):  # named in one warning line (util.verify.warn)
                    warn(f"token store {what[len('redone ('):-1]}; rebuilding it")
                if what != "kept":
                    log(f"{ref.label()}: shard {i + 1}/{len(plan)} {what.split(' ')[0]}: "
                        f"{rec['n_tokens']:,} tokens in {rec['seconds']:.1f} s")
        pool.shutdown(wait=True)
    except BaseException:  # a worker died, a signal, an error: the others end now, not after their shards
        _stop_workers(pool)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    manifest = finalize(ref, root, ident, tok, records, len(plan), need)
    if need is not None and manifest["n_tokens"] < need:
        log(f"{ref.label()}: the whole split holds {manifest['n_tokens']:,} tokens, fewer than the "
            f"{need:,} needed: runs will repeat it")
    return Prepared(ref, root, manifest, sorted(built), sorted(redone), sorted(kept), time.time() - t0)


# ---------------------------------------------------------------------------------------------
# Reading: what training does


class ShardedTokens:
    """The concatenated tokens of a store's shards, read-only: `len()`, and `tokens[idx]` for an
    int array `idx` of any shape (memory-mapped; a window may cross a shard boundary)."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype, n: int):
        self.dtype = np.dtype(dtype)
        self.n = int(n)
        self.paths, self.counts = list(paths), list(counts)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: Optional[list] = None
        self._fds: dict[int, int] = {}

    @property
    def maps(self) -> list:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(c,)) if c else np.empty(0, self.dtype)
                          for p, c in zip(self.paths, self.counts)]
        return self._maps

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def rows(self, starts: np.ndarray, width: int) -> np.ndarray:
        """`[len(starts), width]` tokens, row r = tokens[starts[r]: starts[r] + width], read with
        pread (no mapping: memory stays flat, and a page of a large file costs one read)."""
        out = np.empty((len(starts), width), dtype=self.dtype)
        size = self.dtype.itemsize
        for r, a in enumerate(np.asarray(starts, dtype=np.int64)):
            a = int(a)
            if a < 0 or a + width > self.n:
                raise IndexError(f"tokens [{a}, {a + width}) out of range [0, {self.n})")
            got = 0
            while got < width:  # a row may cross a shard boundary
                pos = a + got
                s = int(np.searchsorted(self.starts, pos, side="right")) - 1
                take = min(width - got, int(self.starts[s + 1]) - pos)
                fd = self._fds.get(s)
                if fd is None:
                    fd = self._fds[s] = os.open(self.paths[s], os.O_RDONLY)
                buf = os.pread(fd, take * size, (pos - int(self.starts[s])) * size)
                if len(buf) != take * size:
                    raise OSError(f"{self.paths[s]}: short read ({len(buf)} of {take * size} bytes)")
                out[r, got: got + take] = np.frombuffer(buf, dtype=self.dtype)
                got += take
        return out

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple:
        return (self.n,)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(self.n), dtype=np.int64)
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"token index out of range [0, {self.n})")
        if idx.ndim == 2 and idx.shape[1] > 1 and np.array_equal(
                idx - idx[:, :1], np.broadcast_to(np.arange(idx.shape[1]), idx.shape)):
            return self.rows(idx[:, 0], idx.shape[1])  # windows: the trainer's batches
        if len(self.maps) == 1:
            return self.maps[0][idx]
        flat = idx.ravel()
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.maps[s][flat[sel] - self.starts[s]]
        return out.reshape(idx.shape)

    def __array__(self, dtype=None, copy=None):
        arr = self[slice(0, self.n)]
        return arr if dtype is None else arr.astype(dtype)


class ShardedStore:
    """A prepared store opened read-only: `.tokens` (`ShardedTokens`), `.meta` (the manifest), `len()`.
    `n_tokens`: read only the first that many (a run's own prefix)."""

    def __init__(self, path: str | os.PathLike, n_tokens: Optional[int] = None):
        self.path = Path(path)
        try:
            m = _read_manifest(self.path / MANIFEST)
        except Damaged as e:
            raise Damaged(e.path, f"{e.why}; `pcbench prepare GRID` writes it again", e.what) from None
        if m is None:
            raise SpecError("data", f"the token store {self.path} is not prepared (no {MANIFEST}): "
                            "run `pcbench prepare GRID` first")
        n = m["n_tokens"] if n_tokens is None else min(int(n_tokens), m["n_tokens"])
        paths, counts, start = [], [], 0
        for s in m["shards"]:
            bin_, _, _ = _shard(self.path, s["shard"])
            size = bin_.stat().st_size if bin_.is_file() else -1
            if size != s["n_tokens"] * np.dtype(m["dtype"]).itemsize:
                raise SpecError("data", f"the token store {self.path} lost or truncated {bin_.name}: run "
                                "`pcbench prepare GRID` again (it redoes the damaged shard)")
            # A shard this reader reads that changed since the prepare stage hashed it (which every
            # run and train does first), or that was never hashed here (`run --no-prepare`, a cleared
            # verified-cache), is hashed now: its bytes must still be those recorded.
            if start < n and not hashed_as_is(bin_):
                try:
                    verify_file(bin_, s["sha256"], what="token store")
                except Damaged as e:
                    raise Damaged(e.path, f"{e.why}; `pcbench prepare GRID` redoes it", e.what) from None
            paths.append(bin_)
            counts.append(s["n_tokens"])
            start += s["n_tokens"]
        self.meta = {**m, "n_tokens": n, "store_tokens": m["n_tokens"]}
        self.tokens = ShardedTokens(paths, counts, np.dtype(m["dtype"]), n)

    def __len__(self) -> int:
        return int(self.meta["n_tokens"])

    def __repr__(self) -> str:
        m = self.meta
        return f"ShardedStore({m['corpus']}/{m['split']}, {m['tokenizer']}, {len(self)} tokens)"

    def document_ends(self) -> np.ndarray:
        """Every document's end offset in the stream (int64), from the shards' .idx files."""
        out = []
        for s, start in zip(self.meta["shards"], self.tokens.starts):
            _, idx, _ = _shard(self.path, s["shard"])
            out.append(np.fromfile(idx, dtype="<i8") + start)
        ends = np.concatenate(out) if out else np.empty(0, np.int64)
        return ends[ends <= len(self)]


def store_dir(ref: StoreRef, tok=None) -> Path:
    return stores_root() / identity(ref, tok)[0]


def open_store(ref: StoreRef, *, n_tokens: Optional[int] = None, need: Optional[int] = None,
               tok=None) -> ShardedStore:
    """The prepared store of `ref`, read-only: never tokenises, locks or opens a connection.
    `n_tokens`: the prefix to read (a cap); `need`: the tokens the caller needs (a store holding
    fewer while its corpus has more is refused: prepare it for this grid)."""
    path = store_dir(ref, tok)
    if not (path / MANIFEST).is_file():
        raise SpecError("data", f"the token store {ref.label()} is not prepared: run `pcbench prepare GRID` "
                        f"(or `pcbench run`, which prepares first); expected {path}/{MANIFEST}")
    store = ShardedStore(path, n_tokens)
    m = store.meta
    if need is not None and not m["complete"] and m["store_tokens"] < need:
        raise SpecError("data", f"the token store {ref.label()} holds {m['store_tokens']:,} tokens, this run "
                        f"needs {need:,}: run `pcbench prepare GRID` for this grid")
    return store


def is_prepared(ref: StoreRef, need: Optional[int] = None, tok=None) -> bool:
    """The store's manifest exists and holds `need` tokens (or the whole split): torch-free, no hashing."""
    try:
        m = _read_manifest(store_dir(ref, tok) / MANIFEST)
    except Damaged:  # the prepare stage names it and writes it again
        return False
    return m is not None and (m["complete"] or (need is not None and m["n_tokens"] >= need))
