"""The prepare stage (issue 22): sharded stores, the same bytes whatever the workers or the
interruptions, damaged shards redone, training that only reads, a memory-flat sampler, prefetch."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pcbench.data import sampler, shards
from pcbench.data.tokens import Batches, TokenStore, prepare_tokens
from pcbench.util.errors import SpecError
from pcbench.util.verify import Damaged

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(20 + i % 13)) for i in range(400)]


def _private(tmp_path: Path) -> Path:
    from pcbench.data import assets

    root = tmp_path / "cache"
    root.mkdir()
    (root / "assets").symlink_to(assets.cache_dir() / "assets", target_is_directory=True)
    return root


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A private cache, and C4 mirrored by four local json.gz files (the hub corpora's shape)."""
    monkeypatch.setenv("PCBENCH_CACHE", str(_private(tmp_path)))
    files = []
    for f in range(4):
        p = tmp_path / "c4" / f"c4-train.{f:05d}-of-00004.json.gz"
        p.parent.mkdir(exist_ok=True)
        with gzip.open(p, "wt") as h:
            for t in TEXTS[f * 100: (f + 1) * 100]:
                h.write(json.dumps({"text": t, "timestamp": "x", "url": "u"}) + "\n")
        files.append(str(p))
    monkeypatch.setenv("PCBENCH_DATA_FILES", json.dumps({"c4": {"train": files, "validation": files[:1]}}))
    return tmp_path


C4 = shards.StoreRef("c4", "bpe-512", "train", "books")
QUIET = {"log": lambda m: None}


def _stream(ref=C4, n=None) -> np.ndarray:
    return np.asarray(shards.open_store(ref, n_tokens=n).tokens)


def _shard_files(p: shards.Prepared) -> dict:
    """Each shard's bytes, and its record but the seconds it took."""
    return {f.name: f.read_bytes() if f.suffix != ".json" else
            {k: v for k, v in json.loads(f.read_text()).items() if k != "seconds"}
            for f in sorted((p.path / "shards").iterdir())}


def test_same_bytes_from_1_and_2_workers_and_the_one_process_path(mirror):
    one = shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    assert one.built == [0, 1, 2, 3] and one.manifest["complete"] and len(one.manifest["shards"]) == 4
    first, stream = _shard_files(one), _stream()
    (one.path / shards.MANIFEST).unlink()
    for f in (one.path / "shards").iterdir():
        f.unlink()
    two = shards.prepare_store(C4, need=10**9, workers=2, **QUIET)
    assert _shard_files(two) == first and np.array_equal(_stream(), stream)
    assert {k: v for k, v in two.manifest.items()} == {k: v for k, v in one.manifest.items()}
    old = prepare_tokens("c4", "bpe-512", "train", max_tokens=10**9)  # today's one-process store
    assert np.array_equal(np.asarray(old.tokens), stream)
    m = two.manifest
    assert m["tokenizer_sha256"] and [s["files"] for s in m["shards"]] == [[f"c4/{i:05d}"] for i in range(4)]
    assert all(s["sources"][0]["bytes"] > 0 for s in m["shards"])
    ends = shards.open_store(C4).document_ends()  # document offsets: each document ends with eos
    assert len(ends) == m["n_documents"] == 400 and (stream[ends - 1] == old.meta["eos_token_id"]).all()


def test_a_need_builds_a_prefix_and_a_run_reads_its_own(mirror):
    p = shards.prepare_store(C4, need=100, workers=1, **QUIET)
    assert len(p.manifest["shards"]) == 1 and not p.manifest["complete"]
    assert shards.is_prepared(C4, 100) and not shards.is_prepared(C4, 10**6)
    with pytest.raises(Exception, match="pcbench prepare"):
        shards.open_store(C4, need=10**6)
    cut = prepare_tokens("c4", "bpe-512", "train", max_tokens=100)
    assert np.array_equal(_stream(n=100), np.asarray(cut.tokens))
    more = shards.prepare_store(C4, need=10**6, workers=1, **QUIET)  # grows behind: the prefix stays
    assert more.kept == [0] and np.array_equal(_stream(n=100), np.asarray(cut.tokens))


def test_sigkill_of_a_worker_mid_shard_then_a_rerun_redoes_only_that_shard(mirror, monkeypatch):
    clean = shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    want, stream = _shard_files(clean), _stream()
    (clean.path / shards.MANIFEST).unlink()
    for f in (clean.path / "shards").glob("0000[23].*"):
        f.unlink()
    monkeypatch.setenv("PCBENCH_TEST_KILL_SHARD", "2")
    with pytest.raises(shards.WorkerDied) as e:
        shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    from pcbench.cli import _one_line

    line = _one_line(e.value)  # an expected error of the environment: one line, exit 1, not "a bug"
    assert line == str(e.value) and "\n" not in line and isinstance(e.value, OSError), line
    assert line.startswith(f"token store {C4.label()} ({clean.path}): a prepare worker died") and \
        line.endswith("run the same command again to go on"), line
    assert not (clean.path / shards.MANIFEST).exists()  # incomplete: no manifest, not readable
    with pytest.raises(Exception, match="not prepared: run `pcbench prepare"):
        shards.open_store(C4)
    monkeypatch.delenv("PCBENCH_TEST_KILL_SHARD")
    again = shards.prepare_store(C4, need=10**9, workers=2, **QUIET)
    assert again.kept == [0, 1] and again.built == [2, 3]
    assert _shard_files(again) == want and np.array_equal(_stream(), stream)


def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (its fork server, resource tracker and workers), from /proc."""
    parent = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():
                parent[int(d.name)] = int((d / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    out, todo = set(), [pid]
    while todo:
        up = todo.pop()
        kids = [c for c, pp in parent.items() if pp == up and c not in out]
        out.update(kids)
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_killed_prepare_leaves_no_worker_or_fork_server_behind(mirror, sig):
    """The prepare's workers are forks of a fork server, not its children: killed, it used to leave
    them (and so the server) idle for good. They end within seconds; SIGTERM also says one line."""
    import signal
    import time

    env = {**os.environ, "PCBENCH_TEST_HOLD_SHARD": "1", "PYTHONPATH": str(ROOT)}
    code = ("from pcbench.data import shards\n"
            "if __name__ == '__main__':\n"
            "    shards.prepare_store(shards.StoreRef('c4', 'bpe-512', 'train', 'books'), need=10**9, workers=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    below: set[int] = set()
    try:
        deadline = time.time() + 120
        while not list((mirror / "cache" / "stores").glob("*/shards/.00001.bin.tmp-*")):  # a worker is in shard 1
            assert proc.poll() is None and time.time() < deadline, "the prepare never reached shard 1"
            time.sleep(0.1)
        below = _descendants(proc.pid)
        assert len(below) >= 3, below  # fork server, two workers (and the resource tracker)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=30)
        deadline = time.time() + 10
        while [p for p in below if _alive(p)] and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in below if _alive(p)], "processes outlived the prepare by 10 s"
        if sig == "SIGTERM":
            assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
            assert err.strip().splitlines() == [f"pcbench: interrupted by SIGTERM: token store {C4.label()}: the "
                                                "shards it finished are kept; run the same command again to go on"], err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in below:  # only what this test started (never a leftover of the old code)
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a fork server")
def test_terminal_signals_while_the_worker_server_imports_are_the_launchers_alone():
    """Ctrl-C / Ctrl-\\ / a closed terminal reach the whole foreground group, the prepare workers'
    fork server too, while it still imports `WORKER_PRELOAD`: it printed a KeyboardInterrupt
    traceback and the pool broke. Now it ignores them from its start; the pool works."""
    code = ("import os, signal, sys, time\n"
            "from pcbench.data import shards\n"
            "if __name__ == '__main__':\n"
            "    ctx = shards._worker_context()\n"
            "    time.sleep(float(sys.argv[1]))\n"
            "    for s in shards.TERMINAL_SIGNALS:\n"
            "        signal.signal(s, signal.SIG_IGN)  # this process is not the subject\n"
            "        os.killpg(0, s)\n"
            "    with ctx.Pool(2, initializer=shards._worker_init, initargs=(dict(os.environ), os.getpid())) as p:\n"
            "        print(p.map(abs, [-1, -2]))\n")
    for delay in ("0.02", "0.1", "0.3"):  # within the server's imports (about 0.5 s here)
        r = subprocess.run([sys.executable, "-c", code, delay], env={**os.environ, "PYTHONPATH": str(ROOT)},
                           cwd=ROOT, capture_output=True, text=True, timeout=120, start_new_session=True)
        assert (r.returncode, r.stdout.strip()) == (0, "[1, 2]"), (delay, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, (delay, r.stderr[-2000:])


def test_a_terminal_signal_while_children_start_still_reaches_this_process():
    """`_blocked_in_children` loses no signal of this process, even with other threads running
    (a process-wide signal goes to a thread that does not block it): one sent meanwhile reaches
    its own handler, and a child started meanwhile has them blocked."""
    import signal
    import threading

    got = []
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # a thread that does not block SIGQUIT
    other.start()
    mine = signal.signal(signal.SIGQUIT, lambda signum, frame: got.append(signum))
    try:
        with shards._blocked_in_children({signal.SIGQUIT}):
            child = subprocess.run([sys.executable, "-c", "import signal; print(signal.SIGQUIT in signal.pthread_sigmask("
                                    "signal.SIG_BLOCK, []))"], capture_output=True, text=True, timeout=60)
            os.kill(os.getpid(), signal.SIGQUIT)
        for _ in range(100):  # the handler runs in the main thread at its next check
            if got:
                break
            time.sleep(0.01)
        assert got == [signal.SIGQUIT] and child.stdout.strip() == "True", (got, child.stdout, child.stderr)
    finally:
        signal.signal(signal.SIGQUIT, mine)
        stop.set()


def test_a_damaged_shard_is_named_and_redone(mirror, capsys):
    p = shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    want = _shard_files(p)
    b = p.path / "shards" / "00001.bin"
    data = bytearray(b.read_bytes())
    data[10] ^= 0xFF
    b.write_bytes(bytes(data))
    # a reader that opens the store before the prepare stage redid it is refused, naming the shard
    with pytest.raises(Damaged, match=f"token store damaged: {b} \\(sha256 mismatch; `pcbench prepare GRID`"):
        shards.open_store(C4)
    capsys.readouterr()
    again = shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    assert again.redone == [1] and again.kept == [0, 2, 3] and _shard_files(again) == want
    err = capsys.readouterr().err
    assert f"pcbench: warning: token store damaged: {b} (sha256 mismatch); rebuilding it" in err, err


@pytest.mark.parametrize("how", ["n_tokens", "dtype", "unsealed", "older"])
def test_a_damaged_or_unsealed_manifest_is_named_never_read_and_written_again(mirror, capsys, how):
    """The manifest is data (counts, dtype, the shards): an edited count made training read half the
    store, an edited dtype failed inside numpy. Now it is sealed: damage is named with its path, the
    store counts as unprepared, and the prepare stage writes it again (keeping every shard). An older
    pcbench's unsealed `manifest.json` is another file: never read, never touched."""
    p = shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    path = p.path / shards.MANIFEST
    rec = json.loads(path.read_text())
    m = rec.get("value", rec)
    if how == "n_tokens":
        m["n_tokens"] //= 2
    elif how == "dtype":
        m["dtype"] = "uint17"
    else:
        rec = m  # unsealed, as an older pcbench wrote its manifest
    if how == "older":  # a store an older pcbench prepared (or keeps preparing, in a shared cache)
        path.unlink()
        older = p.path / "manifest.json"
        older.write_text(json.dumps(rec))
        with pytest.raises(SpecError, match="is not prepared"):
            shards.open_store(C4)
    else:
        path.write_text(json.dumps(rec))
        why = "not a sealed record" if how == "unsealed" else "sha256 mismatch"
        with pytest.raises(Damaged, match=f"token store manifest damaged: {path} \\({why}; `pcbench prepare GRID`"):
            shards.open_store(C4)
    assert not shards.is_prepared(C4, 10**9)
    capsys.readouterr()
    again = shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    assert again.kept == [0, 1, 2, 3] and again.manifest == p.manifest
    err = capsys.readouterr().err
    assert err == ("" if how in ("unsealed", "older") else
                   f"pcbench: warning: token store manifest damaged: {path} (sha256 mismatch); rebuilding it\n"), err
    if how == "older":
        assert json.loads(older.read_text()) == rec  # the other version's file, as it was
    assert len(shards.open_store(C4)) == p.manifest["n_tokens"] and shards.is_prepared(C4, 10**9)


def test_a_local_file_edited_with_its_size_and_mtime_kept_makes_a_new_store(mirror):
    """`cp -p`, `rsync -t`, `tar x`, `touch -r`: other bytes under the old size and mtime. The store
    was named by size and mtime, so the old one was reused (the old tokens); now by content."""
    f = mirror / "c4" / "c4-train.00001-of-00004.json.gz"
    with gzip.open(f, "rt") as h:
        text = h.read()
    size = len(gzip.compress(text.encode())) + 4096
    f.write_bytes(_padded_gzip(text, size))
    first = shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    st = f.stat()
    f.write_bytes(_padded_gzip(text.replace("word1", "wOrd1"), size))  # the same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert shards.store_dir(C4) != first.path and not shards.is_prepared(C4, 10**9)  # another store
    with pytest.raises(Exception, match="not prepared: run `pcbench prepare"):
        _stream()  # never the old tokens


def _padded_gzip(text: str, size: int) -> bytes:
    """`text` gzipped into exactly `size` bytes (a gzip member of padding: FEXTRA bytes)."""
    import struct

    body = gzip.compress(text.encode(), mtime=0)
    pad = size - len(body) - 12  # header 10 + XLEN 2
    assert pad >= 0, (size, len(body))
    return body[:3] + bytes([body[3] | 4]) + body[4:10] + struct.pack("<H", pad) + b"\0" * pad + body[10:]


def test_a_reader_hashes_a_shard_never_hashed_here(mirror):
    """`run --no-prepare` (no prepare stage hashed the shards) with the verified-cache cleared: a
    shard damaged with its size kept is still named, not trained on."""
    import shutil

    from pcbench.util import verify
    from pcbench.util.paths import cache_dir

    p = shards.prepare_store(C4, need=10**9, workers=1, **QUIET)
    b = p.path / "shards" / "00002.bin"
    b.write_bytes(bytes(b.stat().st_size))  # zeros, the same size
    shutil.rmtree(cache_dir() / "verified")
    verify._memo.clear()
    with pytest.raises(Damaged, match=f"token store damaged: {b} \\(sha256 mismatch"):
        shards.open_store(C4)
    shards.prepare_store(C4, need=10**9, workers=1, **QUIET)  # redone
    verify._memo.clear()
    shutil.rmtree(cache_dir() / "verified")
    assert len(shards.open_store(C4)) == p.manifest["n_tokens"]  # intact shards: hashed once, opened


def test_packaged_books_store_is_todays_token_stream_and_batches(prepared_stores):
    """The default study's corpus: the sharded store (prepared with 2 workers) is the one-process
    store's tokens, and the first batches of the default study's sampler are the same."""
    ref = shards.StoreRef("books", "bpe-512", "train", "books")
    new, old = shards.open_store(ref), prepare_tokens("books", "bpe-512", "train")
    assert len(new) == len(old) and np.array_equal(np.asarray(new.tokens), np.asarray(old.tokens))
    assert len(new.meta["shards"]) > 1  # windows cross shard boundaries
    a, b = Batches(old, 64, seed=0), Batches(new, 64, seed=0)
    for step in (0, 1, 57):
        assert torch.equal(a.get(step, 32), b.get(step, 32))
    held_new = shards.open_store(shards.StoreRef("sotu", "bpe-512", "test", "books"))
    held_old = prepare_tokens("sotu", "bpe-512", "test")
    assert np.array_equal(np.asarray(held_new.tokens), np.asarray(held_old.tokens))


def test_training_an_unprepared_store_fails_in_one_line(tmp_path, monkeypatch):
    from test_train import paths, spec_of

    from pcbench.spec.config import SpecError
    from pcbench.train.loop import train

    monkeypatch.setenv("PCBENCH_CACHE", str(_private(tmp_path)))
    with pytest.raises(SpecError) as e:
        train(spec_of(train={"steps": 2}), paths(tmp_path, "r"))
    assert "\n" not in str(e.value) and "not prepared: run `pcbench prepare GRID`" in str(e.value)
    grid = tmp_path / "g.yaml"
    grid.write_text(json.dumps({"name": "g", "defaults": {"data": {"corpus": "books", "tokenizer": "bpe-512",
                                "seq_len": 32, "eval_batches": 1}, "train": {"steps": 2, "batch_size": 4,
                                "device": "cpu"}}, "stages": {"base": {"spec": {"model": {"name": "gpt2-nano"}}}}}))
    r = subprocess.run([sys.executable, "-m", "pcbench.cli", "run", str(grid), "--no-prepare", "--results",
                        str(tmp_path / "res")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("pcbench: error: data: the token store") and
                                   "run `pcbench prepare GRID` first" in ln for ln in lines), r.stderr


def test_training_a_prepared_store_opens_no_connection_and_calls_no_tokeniser(prepared_stores, tmp_path,
                                                                              monkeypatch):
    import socket

    import transformers

    from pcbench.data import corpora, tokens
    from test_train import paths, spec_of

    from pcbench.train.loop import train

    def refuse(*a, **k):
        raise AssertionError("training tried to tokenise or to connect")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for mod, name in ((shards, "build_shard"), (shards, "prepare_store"), (tokens, "prepare_tokens"),
                      (corpora, "iter_documents"), (corpora, "iter_file_documents")):
        monkeypatch.setattr(mod, name, refuse)
    for name in ("__call__", "encode", "batch_encode_plus", "_batch_encode_plus", "_encode_plus"):
        if hasattr(transformers.PreTrainedTokenizerBase, name):
            monkeypatch.setattr(transformers.PreTrainedTokenizerBase, name, refuse, raising=False)
    rec = train(spec_of(train={"steps": 3}), paths(tmp_path, "r"), progress=False)
    assert rec["steps"] == 3 and np.isfinite(rec["heldout_loss"])


# ---------------------------------------------------------------------------------------------
# Sampler and prefetch


@pytest.fixture
def ramp(tmp_path) -> TokenStore:
    return TokenStore.create(tmp_path / "ramp", np.arange(50 * 9 + 5))  # 50 windows of 9


def test_feistel_is_a_keyed_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        for epoch in (0, 1):
            f = sampler.Feistel(n, 7, epoch)
            assert sorted(f(np.arange(n)).tolist()) == list(range(n))
    a, b = sampler.Feistel(1000, 7, 0)(np.arange(1000)), sampler.Feistel(1000, 7, 1)(np.arange(1000))
    assert not np.array_equal(a, b) and not np.array_equal(a, sampler.Feistel(1000, 8, 0)(np.arange(1000)))


def test_small_stores_keep_todays_permutation_large_ones_use_feistel(ramp, monkeypatch):
    b = Batches(ramp, 8, seed=3)
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 0]))).permutation(50)
    assert [int(x[0]) // 9 for x in b.get(0, 10)] == perm[:10].tolist()  # today's order, unchanged
    monkeypatch.setattr(sampler, "PERMUTATION_MAX_WINDOWS", 10)  # this store counts as large
    big = Batches(ramp, 8, seed=3)
    epoch0 = torch.cat([big.get(s, 10) for s in range(5)])
    assert sorted(int(x[0]) // 9 for x in epoch0) == list(range(50))  # every window once an epoch
    assert torch.equal(Batches(ramp, 8, seed=3).get(7, 10), big.get(7, 10))  # resume: the step alone
    assert torch.equal(torch.cat([big.get(7, 10, r, 2) for r in range(2)]), big.get(7, 10))  # rank split


def test_a_100b_token_store_gives_its_first_batch_in_a_second_in_64_mb():
    from pcbench.bench.data import first_batch, make_sparse_store

    import tempfile

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        got = first_batch(make_sparse_store(Path(d) / "s", 10**11), 1024, 64)
    assert got["windows"] > sampler.PERMUTATION_MAX_WINDOWS
    assert got["seconds_to_first_batch"] <= 1.0 and got["rss_growth_mb"] <= 64, got


def test_prefetched_batches_are_the_loops(ramp):
    from pcbench.data.loader import Prefetcher

    b = Batches(ramp, 8, seed=1)
    feed = Prefetcher(lambda s: b.get(s, 4), torch.device("cpu"), 30)
    got = [feed.get(s) for s in (0, 1, 2, 5, 6)]  # a jump (resume) is served too
    feed.close()
    assert all(torch.equal(g, b.get(s, 4)) for g, s in zip(got, (0, 1, 2, 5, 6)))


# ---------------------------------------------------------------------------------------------
# The grid: sizes, the dry run, run ids


def test_store_sizes_come_from_the_runs_and_the_dry_run_lists_them():
    from pcbench.grid import load_grid
    from pcbench.run.prepare import grid_stores, store_rows

    grid = load_grid(ROOT / "experiments" / "paper_gpt2.yaml")
    needs = {n.ref.label(): n for n in grid_stores(grid, grid.runs)}
    train = [r for r in grid.runs if r.kind == "train"]
    biggest = max(r.spec.train.tokens // r.spec.data.seq_len * (r.spec.data.seq_len + 1) for r in train)
    assert abs(needs["c4/train/gpt2"].need - biggest) <= train[0].spec.train.batch_size * 513
    assert needs["c4/val/gpt2"].need == 64 * train[0].spec.train.batch_size * 513
    rows = store_rows(grid, grid.runs)
    assert [r["store"] for r in rows] == ["c4/train/gpt2", "c4/val/gpt2"]
    assert rows[0]["sources"].startswith("hub allenai/c4:en") and float(rows[0]["core_h"]) > 10
    default = load_grid(ROOT / "experiments" / "default.yaml")
    assert [(n.ref.label(), n.need) for n in grid_stores(default, default.runs)] == [
        ("books/train/bpe-512", None), ("sotu/test/bpe-512", None)]


def test_the_default_studys_run_ids_are_unchanged():
    from pcbench.grid import load_grid

    grid = load_grid(ROOT / "experiments" / "default.yaml")
    committed = {p.name for p in (ROOT / "results" / "default" / "runs").iterdir() if p.is_dir()}
    assert {r.id for r in grid.runs} == committed


def test_eval_jobs_of_a_prepared_grid_run_with_the_hub_offline(tmp_path, monkeypatch):
    """An eval stage on the local task suite and a model given by path: the prepare stage builds the
    suite, and the job runs with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (no connection tried)."""
    import socket

    import datasets
    import huggingface_hub
    import yaml

    from pcbench import evaluate
    from pcbench.data.tokenizer import load_tokenizer
    from pcbench.grid import load_grid
    from pcbench.models import build_config, build_model
    from pcbench.run import launch
    from pcbench.run.prepare import hub_needs
    from pcbench.spec.config import ModelSpec

    tok = load_tokenizer("bpe-512")
    model = build_model(build_config(ModelSpec(name="gpt2-nano"), 512, 64, tok.bos_token_id, tok.eos_token_id), seed=0)
    model.save_pretrained(tmp_path / "nano")
    tok.save_pretrained(tmp_path / "nano")
    g = {"name": "offline", "stages": {"eval": {"kind": "eval", "spec": {
        "model": str(tmp_path / "nano"), "tasks": ["pcb_cloze"], "limit": 4, "batch_size": 8, "device": "cpu",
        "threads": 1}}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(g))
    grid = load_grid(tmp_path / "g.yaml")
    assert hub_needs(grid, grid.runs) == {"suite": True, "tasks": [], "models": []}
    for mod, name in ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                      (datasets.config, "HF_DATASETS_OFFLINE")):
        monkeypatch.setattr(mod, name, getattr(mod, name))  # restored after the test
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("connect")))
    seen, real = [], evaluate.run_eval

    def spy(*a, **k):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"),
                     huggingface_hub.constants.HF_HUB_OFFLINE))
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "run_eval", spy)
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    out = launch.submit(grid, store, "debug", progress=False)
    (run,) = grid.runs
    assert out.submitted == [run.id] and store.state(run.id) == "completed", store.status(run.id)
    assert seen == [("1", "1", True)]


def test_a_hub_fetch_that_fails_is_one_line_before_anything_is_prepared_or_submitted(tmp_path, monkeypatch):
    """The jobs run with the hub offline, so what they would fetch is fetched first: a machine that
    cannot reach the hub is told so in one line naming the tasks, and no store or job was started."""
    import lm_eval.tasks
    import yaml

    from pcbench.grid import load_grid
    from pcbench.run import launch, prepare
    from pcbench.spec.config import SpecError

    monkeypatch.setenv("PCBENCH_CACHE", str(_private(tmp_path)))

    def unreachable(tasks, tm):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **k: None)
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", unreachable)
    started = []
    for name in ("prepare_grid", "submit_slurm"):
        monkeypatch.setattr(prepare, name, lambda *a, _n=name, **k: started.append(_n))
    g = {"name": "fetch", "defaults": {"data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32}},
         "stages": {"base": {"spec": {"model": {"name": "gpt2-nano"}, "train": {"steps": 2, "device": "cpu"}}},
                    "eval": {"kind": "eval", "spec": {"model": str(tmp_path / "m"), "tasks": ["arc_easy"]}}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(g))
    grid = load_grid(tmp_path / "g.yaml")
    store = launch.store_for(grid, tmp_path / "res", tmp_path / "work")
    with pytest.raises(SpecError) as e:
        launch.submit(grid, store, "debug", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("prepare: could not fetch the datasets of lm-eval tasks arc_easy "
                                              "(ConnectionError: Couldn't reach 'allenai/ai2_arc'"), msg
    assert started == [] and all(store.state(r.id) not in ("submitted", "running", "completed") for r in grid.runs)


def test_prepare_jobs_ask_for_cpus_only_the_grid_block_then_the_command_line():
    """The prepare array is CPU work: no GPU whatever the training resources; the grid's `prepare:`
    block over the defaults, and the command line's partition/account/qos over both."""
    from pcbench.grid import load_grid
    from pcbench.run.prepare import prepare_resources

    for name in ("paper_gpt2", "paper_llama3_1b", "paper_llama3_8b"):
        grid = load_grid(ROOT / "experiments" / f"{name}.yaml")
        res = prepare_resources(grid)
        assert res.gpus_per_node == 0 and res.partition == "cpu" and res.partition != grid.spec.resources["partition"]
        assert prepare_resources(grid, {"partition": "debug", "qos": "low", "gpus_per_node": 4}).partition == "debug"
        assert prepare_resources(grid, {"partition": None}).partition == "cpu"
        assert prepare_resources(grid, {"gpus_per_node": 4}).gpus_per_node == 0
    plain = load_grid(ROOT / "experiments" / "default.yaml")
    res = prepare_resources(plain)
    assert res.gpus_per_node == 0 and res.cpus_per_task == 1
