"""The data path at scale: tokenising rate of the prepare stage against today's one-process path,
and the sampler's first batch and memory on large stores.

    pcbench bench data [--mb 256] [--files 4] [--tokenizers gpt2,llama3] [--workers 1,2] [--repeats 1]
                       [--sizes 10M,1B,100B] [--out results/bench]

1. A local parquet corpus of FineWeb-Edu's schema (`--files` files, `--mb` million characters of
   packaged book text in all) is generated in a temporary directory. Its default, 256 (~70M GPT-2
   tokens), keeps the prepare path's fixed start (~2 s on 2 cores: transformers' import and the
   tokenizer, `datasets` resolving the files) a few percent of a run, as it is of a real store.
2. For each tokenizer: tokens/s of `tokens.prepare_tokens` (today: one process, the tokenizer's own
   thread pool) and of `shards.prepare_store` with each worker count (one thread per worker), the
   methods in turn; each in a fresh process whose clock starts with the same modules imported
   (torch too) and covers the whole call: tokenizer load, worker start, tokenising, manifest.
3. For each size: a store of that many tokens as sparse shards; in a fresh process, the time to
   open it and cut the first batch (`--rows` windows of `--seq` + 1 tokens) and the growth of its
   resident memory after two batches.
4. The core-hours each paper grid's prepare stage needs at the measured one-worker rate.
Writes `<out>/data-<host>-<time>.json` and `.png`.
"""

from __future__ import annotations

import argparse
import statistics
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pcbench.bench import run_stem, save_figure
from pcbench.bench.machine import cpu_snapshot, finish, machine_info, steal_cores
from pcbench.util.atomic import write_json

FINEWEB_COLUMNS = ("text", "id", "dump", "url", "file_path", "language", "language_score", "token_count",
                   "score", "int_score")


def _size(v: str) -> int:
    mult = {"k": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
    return int(float(v[:-1]) * mult[v[-1]]) if v[-1] in mult else int(v)


def make_corpus(root: Path, files: int, chars: int) -> str:
    """`files` parquet files of FineWeb-Edu's columns holding `chars` characters of book documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pcbench.data import corpora

    docs = list(corpora.iter_documents("books", "train"))
    root.mkdir(parents=True, exist_ok=True)
    per, k, n = chars // files, 0, 0
    for f in range(files):
        rows, size = [], 0
        while size < per:
            text = docs[k % len(docs)] + ("" if k < len(docs) else f" ({k // len(docs)})")
            rows.append(text)
            size += len(text)
            k += 1
        n += len(rows)
        table = pa.table({"text": rows, "id": [f"<urn:{f}:{i}>" for i in range(len(rows))],
                          "dump": ["CC-MAIN-2024-10"] * len(rows), "url": [f"https://x/{i}" for i in range(len(rows))],
                          "file_path": [f"s3://x/{f}.warc.gz"] * len(rows), "language": ["en"] * len(rows),
                          "language_score": [0.9] * len(rows), "token_count": [len(t) // 4 for t in rows],
                          "score": [3.0] * len(rows), "int_score": [3] * len(rows)})
        pq.write_table(table, root / f"{f:03d}_00000.parquet")
    return str(root / "*.parquet")


# Imported before each method's clock starts, the same for every method: `tokens` imports torch
# (which the prepare path's transformers would import inside its clock otherwise).
PRELUDE = "import time; import pcbench.data.tokens, pcbench.data.shards; "


def rate_today(pattern: str, tokenizer: str, cache: Path) -> dict:
    """`tokens.prepare_tokens` on the corpus in a fresh process (today's path, default threads)."""
    code = (PRELUDE + "from pcbench.data.tokens import prepare_tokens; t=time.time(); "
            f"s=prepare_tokens('parquet:{pattern}', {tokenizer!r}, 'train', max_tokens=10**15); "
            "print(len(s), time.time()-t)")
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PCBENCH_CACHE": str(cache)},
                         capture_output=True, text=True, check=True).stdout.split()
    n, s = int(out[-2]), float(out[-1])
    return {"tokens": n, "seconds": s, "tokens_per_s": n / s}


def rate_prepare(pattern: str, tokenizer: str, workers: int, cache: Path) -> dict:
    """`shards.prepare_store` with `workers` processes (one thread each), in a fresh process."""
    code = (PRELUDE + "from pcbench.data import shards; t=time.time(); "
            f"p=shards.prepare_store(shards.StoreRef('parquet:{pattern}', {tokenizer!r}, 'train'), need=10**15, "
            f"workers={workers}, log=lambda m: None); print(p.manifest['n_tokens'], time.time()-t); "
            # waited here, so that its CPU and its workers' (it waited for them) count as this
            # benchmark's, not as other processes' (an unwaited server is reparented to init)
            "import multiprocessing.forkserver as fs; fs._forkserver._stop()")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PCBENCH_CACHE": str(cache)},
                         capture_output=True, text=True, check=True).stdout.split()
    n, s = int(out[-2]), float(out[-1])
    return {"workers": workers, "tokens": n, "seconds": s, "tokens_per_s": n / s}


def median_run(runs: list[dict]) -> dict:
    """The run of median rate (the lower middle one of an even count), with every run's rate."""
    mid = sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]
    return {**mid, "tokens_per_s_each": [round(r["tokens_per_s"]) for r in runs]} if len(runs) > 1 else mid


def make_sparse_store(path: Path, n_tokens: int, shard_tokens: int = 10**11) -> Path:
    """A store of `n_tokens` uint16 zeros as sparse shards (no disk used) with its manifest."""
    from pcbench.data import shards
    from pcbench.util import verify

    (path / "shards").mkdir(parents=True, exist_ok=True)
    recs, left, i = [], n_tokens, 0
    while left > 0:
        n = min(left, shard_tokens)
        with open(path / "shards" / f"{i:05d}.bin", "wb") as f:
            f.truncate(n * 2)
        # As `pcbench prepare` leaves a shard it wrote: hashed as it is (a reader hashes only a shard
        # it finds otherwise); the digest is a placeholder, as hashing 200 GB of zeros is not the point.
        verify.record_digest(path / "shards" / f"{i:05d}.bin", "-")
        recs.append({"shard": i, "files": [], "sources": [], "n_tokens": n, "n_documents": 0,
                     "sha256": "-", "idx_sha256": "-"})
        left -= n
        i += 1
    verify.write_sealed_json(path / shards.MANIFEST, {  # sealed, as `shards.finalize` writes it
        "format": shards.FORMAT, "corpus": "sparse", "split": "train", "tokenizer": "ids", "dtype": "uint16",
        "n_tokens": n_tokens, "n_documents": 0, "complete": True, "shards": recs})
    return path


def first_batch(path: Path, seq_len: int, rows: int) -> dict:
    """In a fresh process: seconds to open the store and cut batch 0, and the RSS growth (MB)."""
    code = f"""
import os, time, resource
def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
from pcbench.data.shards import ShardedStore
from pcbench.data.tokens import Batches
r0 = rss(); t = time.time()
b = Batches(ShardedStore({str(path)!r}), {seq_len}, seed=0)
x = b.get(0, {rows})
t1 = time.time() - t
y = b.get(1000, {rows})
print(t1, (rss() - r0) / 2**20, b.n_windows)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"seconds_to_first_batch": float(out[0]), "rss_growth_mb": float(out[1]), "windows": int(out[2])}


def grid_core_hours(rate_per_core: dict) -> dict:
    """Core-hours of each paper grid's prepare stage at the measured one-worker rates."""
    from pcbench.grid import load_grid
    from pcbench.run import prepare

    out = {}
    root = Path(__file__).resolve().parents[2] / "experiments"
    for name in ("paper_gpt2", "paper_llama3_1b"):
        grid = load_grid(str(root / f"{name}.yaml"))
        needs = prepare.grid_stores(grid, grid.runs)
        total = 0.0
        for n in needs:
            tok = n.ref.tokenizer if n.ref.tokenizer in rate_per_core else "llama3"
            total += (n.need or 0) / prepare.keep_share(n.ref) / rate_per_core.get(tok, prepare.DEFAULT_RATE) / 3600
        out[name] = {"tokens": sum(n.need or 0 for n in needs), "core_hours": round(total, 2)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pcbench bench data")
    p.add_argument("--mb", type=float, default=256, help="million characters of corpus")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--tokenizers", default="gpt2,llama3")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the methods in turn (each one's median is kept)")
    p.add_argument("--sizes", default="10M,1B,100B")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--tmp", default=None, help="scratch directory (sparse files; default: a temporary one)")
    p.add_argument("--out", default="results/bench")
    a = p.parse_args(argv)
    info = machine_info()
    rec: dict = {"bench": "data", "args": vars(a), "rates": {}, "sampler": {}}
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="pcbench-bench-data-") as tmp:
        tmp = Path(tmp)
        assets_src = Path(os.environ.get("PCBENCH_CACHE", Path.home() / ".cache" / "pcbench")) / "assets"
        pattern = make_corpus(tmp / "corpus", a.files, int(a.mb * 1e6))
        for tok in a.tokenizers.split(","):
            methods = [("today", lambda c: rate_today(pattern, tok, c))] + [
                (f"workers_{w}", (lambda w: lambda c: rate_prepare(pattern, tok, w, c))(int(w)))
                for w in a.workers.split(",")]
            samples: dict = {label: [] for label, _ in methods}
            for rep in range(a.repeats):  # the methods in turn, each repeat: a shared machine's noise spreads over all
                for label, fn in methods:
                    cache = tmp / f"cache-{tok}-{label}-{rep}"
                    cache.mkdir()
                    (cache / "assets").symlink_to(assets_src, target_is_directory=True)
                    snap = cpu_snapshot()
                    samples[label].append({**fn(cache), "hypervisor_steal_cores": steal_cores(snap, cpu_snapshot())})
                    print(f"[bench data] {tok} {label} ({rep + 1}/{a.repeats}): "
                          f"{samples[label][-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
            r = {label: median_run(runs) for label, runs in samples.items()}
            if "workers_1" in r and "workers_2" in r:
                r["speedup_2_over_1"] = r["workers_2"]["tokens_per_s"] / r["workers_1"]["tokens_per_s"]
                r["workers_2_over_today"] = r["workers_2"]["tokens_per_s"] / r["today"]["tokens_per_s"]
                # the same ratios within each round (the methods ran back to back): a shared machine's
                # slow and fast spells cancel; the median over rounds
                for key, num, den in (("speedup_2_over_1", "workers_2", "workers_1"),
                                      ("workers_2_over_today", "workers_2", "today")):
                    each = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(samples[num], samples[den])]
                    r[f"{key}_each_round"] = [round(v, 3) for v in each]
                    r[f"{key}_paired_median"] = float(statistics.median(each))
            rec["rates"][tok] = r
        for size in a.sizes.split(","):
            path = make_sparse_store(tmp / f"sparse-{size}", _size(size))
            rec["sampler"][size] = first_batch(path, a.seq, a.rows)
            print(f"[bench data] {size}: {rec['sampler'][size]}", file=sys.stderr)
    per_core = {t: r["workers_1"]["tokens_per_s"] for t, r in rec["rates"].items() if "workers_1" in r}
    rec["grids"] = grid_core_hours(per_core)
    rec["machine"] = finish(info)
    stem = run_stem(Path(a.out), "data")
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), rec)
    _figure(rec, stem.with_suffix(".png"))
    print(json.dumps({"json": str(stem.with_suffix(".json")), "rates": {t: {k: round(v["tokens_per_s"])
                      for k, v in r.items() if isinstance(v, dict)} for t, r in rec["rates"].items()},
                      "sampler": rec["sampler"], "grids": rec["grids"]}, indent=1))
    return 0


def _figure(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (tok, r) in enumerate(rec["rates"].items()):
        labels = [k for k, v in r.items() if isinstance(v, dict)]
        ax1.bar([x + 0.4 * i for x in range(len(labels))], [r[k]["tokens_per_s"] / 1e3 for k in labels], 0.4, label=tok)
        ax1.set_xticks(range(len(labels)), labels)
    ax1.set_ylabel("thousand tokens/s")
    ax1.legend()
    sizes = list(rec["sampler"])
    ax2.bar(sizes, [rec["sampler"][s]["seconds_to_first_batch"] for s in sizes])
    ax2.set_ylabel("seconds to the first batch")
    save_figure(fig, path)
