"""Token shards and deterministic, resumable training batches.

`prepare_tokens` tokenises a corpus split once into a flat token array (eos after every document),
cached under `cache_dir()/tokens/<key>/` as `tokens.bin` (raw uint16/uint32) + `meta.json`, which
records the sha256 of `tokens.bin` (`tokens_sha256`); every open checks it (`pcbench.util.verify`:
hashed once per version of the file), and a damaged store is named in one warning line and rebuilt.
`Batches` cuts the array into non-overlapping windows of `seq_len + 1` tokens and serves global
batch `step` as a pure function of (seed, step, rows, rank, world): resuming, or splitting a batch
over processes, gives bit-identical rows. The training loop uses `inputs = batch[:, :-1]` and
`targets = batch[:, 1:]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from pcbench import __version__

from pcbench.data import corpora
from pcbench.data.sampler import window_order  # today's permutation for small stores, Feistel above
from pcbench.util.atomic import file_lock, read_json, replace_dir, sweep_temps, temp_dir, write_json
from pcbench.util.paths import cache_dir
from pcbench.util.verify import Damaged, sha256_bytes, sha256_file, verify_file, warn

FORMAT = "pcbench-tokens/1"
DOCS_PER_CALL = 1000


class TokenStore:
    """A tokenised corpus split: `.tokens` (read-only 1-D np.memmap), `.meta` (dict), `len()`."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no token store at {self.path} (meta.json missing)")
        try:
            self.meta: dict = read_json(meta_path)
        except (OSError, ValueError) as e:
            raise Damaged(meta_path, f"unreadable: {getattr(e, 'msg', None) or e}", "token store") from None
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: token format {self.meta.get('format')!r}, expected {FORMAT!r}")
        dtype = np.dtype(self.meta["dtype"])
        size = (self.path / "tokens.bin").stat().st_size
        if size != self.meta["n_tokens"] * dtype.itemsize:
            raise Damaged(self.path / "tokens.bin", f"{size} bytes, meta.json says {self.meta['n_tokens']} x "
                          f"{dtype.itemsize}: truncated or extended", "token store")
        if verify and self.meta.get("tokens_sha256"):  # checked against what was recorded when written
            verify_file(self.path / "tokens.bin", self.meta["tokens_sha256"], what="token store")
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r",
                                shape=(self.meta["n_tokens"],))

    @classmethod
    def create(cls, path: str | os.PathLike, tokens: np.ndarray, **meta) -> "TokenStore":
        """Write `tokens` (1-D ints) as a store at `path` atomically; `meta` adds to the defaults."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size == 0 or tokens.min() < 0:
            raise ValueError(f"tokens must be a non-empty 1-D array of ids >= 0, got shape {tokens.shape}")
        vocab = int(meta.pop("vocab_size", int(tokens.max()) + 1))
        dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(path)
        try:
            data = tokens.astype(dtype).tobytes()
            (tmp / "tokens.bin").write_bytes(data)
            write_json(tmp / "meta.json", {"format": FORMAT, "corpus": "array", "split": "train",
                                           "tokenizer": "ids", "n_documents": 1, **meta,
                                           "vocab_size": vocab, "dtype": dtype.name, "n_tokens": len(tokens),
                                           "tokens_sha256": sha256_bytes(data)})
            os.chmod(tmp, 0o755)
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)

    def __len__(self) -> int:
        return int(self.meta["n_tokens"])

    def __repr__(self) -> str:
        m = self.meta
        return f"TokenStore({m['corpus']}/{m['split']}, {m['tokenizer']}, {len(self)} tokens)"


def store_key(corpus: str, tokenizer: str, split: str, max_tokens: Optional[int] = None,
              *, tokenizer_corpus: str = "books", tok=None) -> tuple[str, dict]:
    """(directory name, identity dict) of a token store: corpus inputs + tokenizer + cap."""
    from pcbench.data.tokenizer import fingerprint, load_tokenizer

    tok = tok if tok is not None else load_tokenizer(tokenizer, corpus=tokenizer_corpus)
    ident = {"format": FORMAT, "corpus": corpus, "split": split, "max_tokens": max_tokens,
             "inputs_sha256": corpora.fingerprint(corpus, split),
             "tokenizer_sha256": fingerprint(tok)}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    label = tokenizer if not Path(tokenizer).is_dir() else Path(tokenizer).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{corpus}-{split}-{label}")[:80]
    return f"{name}-{digest}", ident


def prepare_tokens(corpus: str, tokenizer: str, split: str, *, max_tokens: int | None = None,
                   tokenizer_corpus: str = "books") -> TokenStore:
    """Tokenise `corpus`/`split` with `tokenizer` once (cached, locked, atomic).

    `max_tokens` keeps the first that many tokens (required for streamed corpora).
    `tokenizer_corpus` is what a `bpe-<N>` tokenizer was trained on (as in `load_tokenizer`): pass
    the training corpus for the held-out set too, so both use the same ids. Local mirrors of hub
    corpora come from `$PCBENCH_DATA_FILES` (see `pcbench.data.corpora`).
    """
    from pcbench.data.tokenizer import load_tokenizer

    corpora.check_split(corpus, split)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if max_tokens is None and corpora.is_streaming(corpus):
        raise ValueError(f"corpus {corpus!r} is streamed: give max_tokens to bound it")
    tok = load_tokenizer(tokenizer, corpus=tokenizer_corpus)
    name, ident = store_key(corpus, tokenizer, split, max_tokens, tokenizer_corpus=tokenizer_corpus, tok=tok)
    root = cache_dir() / "tokens"
    out = root / name
    if (out / "meta.json").exists():
        try:
            return _open(out)
        except Damaged as e:  # a cache entry: rebuilt (below, under the lock)
            warn(f"{e}; rebuilding it")
    with file_lock(root / f".{name}.lock"):
        if (out / "meta.json").exists():
            try:
                return _open(out)  # intact, or rebuilt by another process meanwhile
            except Damaged:
                _remove_damaged(out)
        _write_store(out, tok, corpora.iter_documents(corpus, split),
                     max_tokens, {**ident, "tokenizer": tokenizer, "tokenizer_corpus": tokenizer_corpus})
    return TokenStore(out)


def _open(path: Path) -> TokenStore:
    """The store at `path`, verified; one written before pcbench recorded a store's sha256 has it
    recorded now (from its size-checked bytes), so every later read is checked."""
    store = TokenStore(path)
    if not store.meta.get("tokens_sha256"):
        store.meta["tokens_sha256"] = sha256_file(path / "tokens.bin")
        write_json(path / "meta.json", store.meta)
    return store


def _remove_damaged(path: Path) -> None:
    """Take a damaged cache entry out of the way (renamed first: a reader never sees it half gone)."""
    aside = path.with_name(f".{path.name}.damaged-{os.getpid()}-{time.time_ns()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _write_store(out: Path, tok, docs: Iterator[str], max_tokens: Optional[int], meta: dict) -> None:
    from tqdm.auto import tqdm

    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    vocab = len(tok)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {meta['tokenizer']!r} has no eos token")
    sweep_temps(out)  # under the store's lock: a dead writer's
    tmp = temp_dir(out)
    n_tokens = n_docs = 0
    digest = hashlib.sha256()
    t0 = time.time()
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"tokenise {meta['corpus']}/{meta['split']}",
               disable=not sys.stderr.isatty(), leave=False)
    try:
        with open(tmp / "tokens.bin", "wb") as f:
            for chunk in corpora.batched(docs, DOCS_PER_CALL):
                encs = encode(chunk, add_special_tokens=False)
                lens = [len(e.ids) + 1 for e in encs]
                arr = np.empty(sum(lens), dtype=np.int64)
                pos = 0
                for e, n in zip(encs, lens):
                    arr[pos: pos + n - 1] = e.ids
                    arr[pos + n - 1] = eos
                    pos += n
                ends = np.cumsum(lens)
                if max_tokens is not None and n_tokens + len(arr) >= max_tokens:
                    keep = max_tokens - n_tokens
                    arr = arr[:keep]
                    n_docs += int(np.searchsorted(ends, keep, side="left")) + 1
                else:
                    n_docs += len(chunk)
                if len(arr) and int(arr.max()) >= vocab:
                    raise ValueError(f"token id {int(arr.max())} >= vocabulary {vocab}")
                data = arr.astype(dtype).tobytes()
                f.write(data)
                digest.update(data)
                n_tokens += len(arr)
                bar.update(len(arr))
                if max_tokens is not None and n_tokens >= max_tokens:
                    break
            f.flush()
            os.fsync(f.fileno())
        if n_tokens == 0:
            raise ValueError(f"corpus {meta['corpus']!r} split {meta['split']!r} has no documents")
        meta.update(vocab_size=vocab, dtype=dtype.name, n_tokens=n_tokens, n_documents=n_docs,
                    tokens_sha256=digest.hexdigest(),
                    eos_token_id=eos, pcbench_version=__version__, seconds=round(time.time() - t0, 2))
        write_json(tmp / "meta.json", meta)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)  # an incomplete store there (its meta.json lost) is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()


class Batches:
    """Deterministic training windows of `seq_len + 1` tokens from `store`.

    The windows are the non-overlapping slices `[i*(seq_len+1), (i+1)*(seq_len+1))`; epoch `e`
    visits them in the order of a permutation drawn from `np.random.default_rng([seed, e])`, and the
    epochs are concatenated into one stream. Global batch `step` is stream positions
    `[step*rows, (step+1)*rows)`; rank `r` of `world` gets its contiguous `rows // world` of them.
    """

    def __init__(self, store: TokenStore, seq_len: int, seed: int):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.store, self.seq_len, self.seed = store, seq_len, int(seed)
        self.window = seq_len + 1
        self.n_windows = len(store) // self.window
        if self.n_windows == 0:
            raise ValueError(f"{store!r} has {len(store)} tokens, fewer than one window of {self.window}")
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of `epoch` (the two most recent are cached)."""
        if epoch not in self._perms:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perms[epoch] = rng.permutation(self.n_windows)
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def steps_per_epoch(self, rows: int) -> float:
        return self.n_windows / rows

    def get(self, step: int, rows: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Rank `rank`'s rows of global batch `step`: LongTensor [rows // world, seq_len + 1]."""
        for name, v, lo in (("step", step, 0), ("rows", rows, 1), ("rank", rank, 0), ("world", world, 1)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if rank >= world:
            raise ValueError(f"rank {rank} is not below world {world}")
        if rows % world:
            raise ValueError(f"rows {rows} do not split evenly over world {world}")
        if rows > self.n_windows:
            raise ValueError(f"a batch of {rows} rows needs {rows} windows; the store has only "
                             f"{self.n_windows} windows of {self.window} tokens")
        per = rows // world
        pos = np.arange(step * rows + rank * per, step * rows + (rank + 1) * per, dtype=np.int64)
        epochs, idx = np.divmod(pos, self.n_windows)
        windows = np.empty(per, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            windows[sel] = window_order(self.n_windows, self.seed, int(e), idx[sel], self.permutation)
        return self._gather(windows)

    def _gather(self, windows: np.ndarray) -> torch.Tensor:
        offs = windows[:, None] * self.window + np.arange(self.window, dtype=np.int64)[None, :]
        return torch.from_numpy(self.store.tokens[offs].astype(np.int64))


def eval_batches(store: TokenStore, seq_len: int, rows: int, max_batches: int) -> Iterator[torch.Tensor]:
    """Fixed held-out batches: up to `max_batches` LongTensors [rows, seq_len + 1] of windows in order.

    The `rows * max_batches` windows are spread evenly over the store (consecutive when it holds no
    more), so a small evaluation budget still covers the whole held-out set.
    """
    if seq_len < 1 or rows < 1 or max_batches < 0:
        raise ValueError(f"need seq_len >= 1, rows >= 1, max_batches >= 0; got {seq_len}, {rows}, {max_batches}")
    window = seq_len + 1
    n_windows = len(store) // window
    if n_windows < rows:
        raise ValueError(f"{store!r} has {n_windows} windows of {window} tokens, fewer than one batch of {rows}")
    n_batches = min(max_batches, n_windows // rows)
    stride = max(1, n_windows // max(1, n_batches * rows))
    ar = np.arange(window, dtype=np.int64)[None, :]
    for b in range(n_batches):
        windows = np.arange(b * rows, (b + 1) * rows, dtype=np.int64) * stride
        yield torch.from_numpy(store.tokens[windows[:, None] * window + ar].astype(np.int64))
