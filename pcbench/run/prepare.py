"""The prepare stage of a grid: every token store its runs read, built before any training job.

`grid_stores(grid, runs)` lists the stores the runs read (`spec.stores.run_stores`), merged: a
store must hold the largest prefix any of its runs reads (None: a packaged corpus's whole split).
`prepare_grid` builds them with `data.shards.prepare_store` (a local pool of worker processes);
`pcbench prepare GRID` and `pcbench run` (first, before any job) call it. Training jobs then only
open the stores' manifests. `store_rows` is what the dry run shows of each store.
"""

from __future__ import annotations

import math
from pathlib import Path
import sys
from dataclasses import dataclass, field
from typing import Optional

from pcbench.data import corpora
from pcbench.data.shards import StoreRef
from pcbench.util.errors import SpecError
from pcbench.spec.stores import run_stores
from pcbench.store import parse_ref

# Tokens per second of one prepare worker (one core, one tokenizer thread): the medians of
# results/bench/data-vm-20261207-122817.json (2-core AMD VM, 256 MB FineWeb-Edu-shaped parquet);
# `pcbench bench data` measures them on your machine. Other tokenizers: GPT-2's rate.
TOKENS_PER_CORE_S = {"gpt2": 758_000, "llama3": 767_000}
DEFAULT_RATE = 758_000


@dataclass
class StoreNeed:
    ref: StoreRef
    need: Optional[int]  # tokens the store must hold; None: the whole split
    runs: list = field(default_factory=list)


def resolve_tokenizer(run, by_id: dict) -> Optional[str]:
    """The tokenizer a run's data is tokenised with: `model` is its base checkpoint's, followed
    through `run:<id>` references to the run that made it; None: not knowable before training."""
    seen = set()
    while True:
        spec = run.spec
        if spec.data.tokenizer != "model":
            return spec.data.tokenizer
        path = spec.model.path
        rid = parse_ref(path) if path else None
        if rid is None:
            if path:
                return path
            from pcbench.models import pretrained_path  # a preset's own weights (imports torch)

            try:
                return pretrained_path(spec.model)
            except Exception:  # noqa: BLE001 - the preflight names a missing checkpoint
                return None
        if rid in seen or rid not in by_id or by_id[rid].kind != "train":
            return None
        seen.add(rid)
        run = by_id[rid]


def grid_stores(grid, runs) -> list[StoreNeed]:
    """The stores the training runs among `runs` read, in first-use order, with what each must hold."""
    by_id = grid.by_id()
    out: dict[StoreRef, StoreNeed] = {}
    for run in runs:
        if run.kind != "train":
            continue
        tok = resolve_tokenizer(run, by_id)
        if tok is None:
            continue
        for s in run_stores(run.spec, tok).values():
            n = out.get(s.ref)
            if n is None:
                out[s.ref] = StoreNeed(s.ref, s.need, [run.id])
                continue
            n.runs.append(run.id)
            n.need = None if n.need is None or s.need is None else max(n.need, s.need)
    return list(out.values())


def describe_sources(ref: StoreRef) -> str:
    """The source files, without the network: counted locally, named for a hub corpus."""
    try:
        src = corpora.source(ref.corpus, ref.split) if corpora.is_streaming(ref.corpus) else None
        if src is not None and src["data_files"] is None:
            return f"hub {src['path']}{':' + src['name'] if src['name'] else ''} ({src['split']})"
        n = len(corpora.source_files(ref.corpus, ref.split))
        return f"{n} file{'s' if n != 1 else ''}"
    except Exception as e:  # noqa: BLE001 - shown, and the preflight names it
        return f"? ({' '.join(str(e).split())[:60]})"


def keep_share(ref: StoreRef) -> float:
    """The share of the tokenised text a store keeps: a split carved from train (fineweb-edu's val)
    keeps ~2% of each file it reads, so it tokenises ~50x what it holds."""
    carve = corpora.source(ref.corpus, ref.split)["carve"] if corpora.is_streaming(ref.corpus) else None
    return {None: 1.0, "val": corpora.VAL_PER_MILLE / 1000, "train": 1 - corpora.VAL_PER_MILLE / 1000}[carve]


def core_hours(ref: StoreRef, tokens: Optional[int]) -> Optional[float]:
    if tokens is None:
        return None
    return tokens / keep_share(ref) / TOKENS_PER_CORE_S.get(ref.tokenizer, DEFAULT_RATE) / 3600


def prepared(n: StoreNeed) -> Optional[bool]:
    from pcbench.data import shards

    try:
        return shards.is_prepared(n.ref, n.need)
    except Exception:  # noqa: BLE001 - a tokenizer not available yet (e.g. a hub one): unknown
        return None


def store_rows(grid, runs) -> list[dict]:
    """One row per store for the dry run: corpus, tokenizer, tokens needed, files, core-hours, prepared."""
    rows = []
    for n in grid_stores(grid, runs):
        p = prepared(n)
        ch = core_hours(n.ref, n.need)
        rows.append({"store": n.ref.label(), "runs": len(n.runs),
                     "tokens_needed": "whole split" if n.need is None else _human(n.need),
                     "sources": describe_sources(n.ref),
                     "core_h": "<0.1" if ch is None or ch < 0.1 else f"{ch:.1f}",
                     "prepared": {True: "yes", False: "no", None: "?"}[p]})
    return rows


def _human(n: int) -> str:
    for unit, k in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= k:
            return f"{n / k:.1f}{unit}"
    return str(n)


def missing_stores(grid, runs) -> list[str]:
    """One line per store the runs read that is not prepared (for the preflight of `--no-prepare`)."""
    return [f"data: the token store {n.ref.label()} is not prepared ({'the whole split' if n.need is None else f'{n.need:,} tokens'}"
            f" for {len(n.runs)} run(s)): run `pcbench prepare GRID` first"
            for n in grid_stores(grid, runs) if prepared(n) is False]


def prepare_grid(grid, runs, workers: Optional[int] = None, log=None) -> list:
    """Build every store the training runs among `runs` read (what is there already is checked
    and kept). Returns the `shards.Prepared` of each."""
    from pcbench.data import shards

    log = log or (lambda m: print(f"[pcbench] {m}", file=sys.stderr, flush=True))
    needs = grid_stores(grid, runs)
    out = []
    for k, n in enumerate(needs, 1):
        what = "the whole split" if n.need is None else f"{n.need:,} tokens"
        log(f"prepare {k}/{len(needs)}: {n.ref.label()} ({what}, {len(n.runs)} run(s))")
        p = shards.prepare_store(n.ref, need=n.need, workers=workers, log=log)
        log(f"prepare {k}/{len(needs)}: {n.ref.label()} ready: {p.manifest['n_tokens']:,} tokens in "
            f"{len(p.manifest['shards'])} shards ({len(p.built)} built, {len(p.redone)} redone, "
            f"{len(p.kept)} kept, {p.seconds:.1f} s)")
        out.append(p)
    return out


def prepare_spec(spec, workers: Optional[int] = None, log=None) -> list:
    """`pcbench train` / `compress`: the stores of one training spec, built here before it trains."""
    from pcbench.data import shards
    from pcbench.train.loop import data_tokenizer_name

    return [shards.prepare_store(s.ref, need=s.need, workers=workers, log=log)
            for s in run_stores(spec, data_tokenizer_name(spec)).values()]


def estimate(needs: list[StoreNeed]) -> float:
    """Core-hours to prepare `needs` from nothing at the measured rate (whole splits: not counted)."""
    return math.fsum(core_hours(n.ref, n.need) or 0.0 for n in needs)


# ---------------------------------------------------------------------------------------------
# The prepare stage on SLURM: a CPU job array (one task per missing shard), then a finalising job


# Tokens per source file of the hub corpora, to size a capped store's array before any file is read
# (a short estimate is safe: the finalising job builds what the array left and says so).
HUB_TOKENS_PER_FILE = {"c4": 150_000_000, "fineweb-edu": 700_000_000}
LOCAL_TOKENS_PER_BYTE = 0.25  # plain text; compressed files hold more: an underestimate, again safe


def prepare_resources(grid, override: Optional[dict] = None):
    """The prepare jobs' resources: the grid's `prepare:` block over CPU defaults (one CPU per
    array task, the grid's partition/account/qos), then the command line's partition/account/qos."""
    from pcbench.grid import Resources
    from pcbench.spec.config import from_dict

    base = {k: v for k, v in (grid.spec.resources or {}).items()
            if k in ("partition", "account", "qos", "constraint", "timeout_min")}
    base.update({"cpus_per_task": 1, "gpus_per_node": 0})
    base.update(grid.spec.prepare or {})
    base.update({k: v for k, v in (override or {}).items() if k in ("partition", "account", "qos") and v is not None})
    res = from_dict(Resources, base, "grid.prepare")
    res.validate("grid.prepare")
    return res


def _groups_needed(n: StoreNeed, plan: list) -> int:
    if n.need is None:
        return len(plan)
    keep = keep_share(n.ref)
    per = []
    for g in plan:
        key = n.ref.corpus
        if key in HUB_TOKENS_PER_FILE and not corpora.source(n.ref.corpus, n.ref.split)["data_files"]:
            per.append(HUB_TOKENS_PER_FILE[key] * len(g))
        else:
            per.append(sum(max(1, int(_size(f.path) * LOCAL_TOKENS_PER_BYTE)) for f in g))
    total, k = 0, 0
    while k < len(plan) and total * keep < n.need * 1.1:  # a carved split keeps a share of each file
        total += per[k]
        k += 1
    return k


def _size(path: str) -> int:
    import os

    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def shard_task(ref: StoreRef, i: int) -> str:
    """One array task: shard `i` of `ref`'s store, unless it is whole already."""
    import os

    from pcbench.data import shards

    os.environ.update(shards.ONE_CORE_ENV)
    name, _ = shards.identity(ref)
    root = shards.stores_root() / name
    files = shards.groups(ref)[i]
    rec, why = shards.check_shard(root, i, files)
    if rec is not None:
        return f"{ref.label()} shard {i}: kept"
    rec = shards.build_shard(ref, root, i, files)
    return f"{ref.label()} shard {i}: {'built' if why == 'missing' else 'redone (' + why + ')'}, {rec['n_tokens']} tokens"


def finalize_task(items: list) -> list:
    """The finalising job: check every shard, build what the array left, write each manifest."""
    from pcbench.data import shards

    out = []
    for ref, need, workers in items:
        p = shards.prepare_store(ref, need=need, workers=workers)
        out.append(f"{ref.label()}: {p.manifest['n_tokens']} tokens, {len(p.built)} built here, "
                   f"{len(p.redone)} redone, {len(p.kept)} kept")
    return out


def submit_slurm(grid, todo, log_dir, override: Optional[dict] = None, cluster: str = "slurm") -> Optional[str]:
    """Submit the prepare stage of the runs `todo`: one array task per shard not built yet, then a
    finalising job (afterok on the array) writing the manifests. Returns the finalising job's id
    (training jobs wait for it: afterok), or None when every store is prepared already."""
    import submitit

    from pcbench.data import shards

    needs = [n for n in grid_stores(grid, todo) if prepared(n) is not True]
    if not needs:
        return None
    res = prepare_resources(grid, override)
    tasks = []
    for n in needs:
        tok = shards.load_tok(n.ref, offline=False)  # a bpe-<N> trained once, here; a hub one fetched
        name, _ = shards.identity(n.ref, tok)
        plan = shards.groups(n.ref)
        for i in range(_groups_needed(n, plan)):
            if not (shards.stores_root() / name / "shards" / f"{i:05d}.json").is_file():
                tasks.append((n.ref, i))

    def make(name: str, cpus: int):
        ex = submitit.AutoExecutor(folder=str(Path(log_dir) / "%j"), cluster=cluster)
        params = {"timeout_min": res.timeout_min or 60, "cpus_per_task": cpus, "name": name}
        if cluster == "slurm":
            params.update(slurm_partition=res.partition, slurm_array_parallelism=res.array_parallelism)
            if res.mem_gb:
                params["mem_gb"] = res.mem_gb
            for key, f in (("slurm_account", "account"), ("slurm_qos", "qos")):
                if getattr(res, f):
                    params[key] = getattr(res, f)
        ex.update_parameters(**params)
        return ex

    array = []
    if tasks:
        ex = make("pcbench-prepare", 1)
        array = ex.map_array(shard_task, [t[0] for t in tasks], [t[1] for t in tasks])
        print(f"[pcbench] prepare: {len(tasks)} shard task(s) submitted as job array {array[0].job_id.split('_')[0]}",
              file=sys.stderr)
    fin = make("pcbench-prepare-final", res.cpus_per_task)
    if array and cluster == "slurm":
        fin.update_parameters(slurm_additional_parameters={
            "dependency": "afterok:" + array[0].job_id.split("_")[0], "kill-on-invalid-dep": "yes"})
    job = fin.submit(finalize_task, [(n.ref, n.need, res.cpus_per_task) for n in needs])
    print(f"[pcbench] prepare: finalising job {job.job_id} writes {len(needs)} manifest(s); training jobs wait for it",
          file=sys.stderr)
    return str(job.job_id)


# ---------------------------------------------------------------------------------------------
# Fetched once, then offline: what else the jobs would fetch (lm-eval task datasets, hub weights)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def hub_needs(grid, runs) -> dict:
    """{"suite": the local lm-eval suite is used, "tasks": [(tasks, include_path)], "models": [hub ids]}
    of the runs: the eval stages' tasks and the hub weights training runs start from."""
    from pcbench.data.tasks import GROUP, TASKS
    from pcbench.models import PRESETS

    out: dict = {"suite": False, "tasks": [], "models": []}
    for run in runs:
        spec = run.spec
        if run.kind == "eval":
            local = {*TASKS, GROUP}
            out["suite"] = out["suite"] or any(t in local for t in spec.tasks)
            hub = [t for t in spec.tasks if t not in local]
            if hub and (hub, spec.include_path) not in out["tasks"]:
                out["tasks"].append((hub, spec.include_path))
            continue
        m = spec.model
        if m.path is None and m.name in PRESETS and (PRESETS[m.name].weights or "").startswith("hub:"):
            hub_id = PRESETS[m.name].weights[4:]
            if hub_id not in out["models"]:
                out["models"].append(hub_id)
    return out


def fetch_for_jobs(grid, runs, log=None) -> dict:
    """Build the local task suite, download the hub tasks' datasets and the hub weights into the
    shared caches (HF_HOME / HF_DATASETS_CACHE): the jobs then run with the hub offline."""
    log = log or (lambda m: print(f"[pcbench] {m}", file=sys.stderr, flush=True))
    need = hub_needs(grid, runs)
    if need["suite"]:
        from pcbench.data.tasks import build_tasks

        build_tasks()
    for tasks, include in need["tasks"]:
        from lm_eval.tasks import TaskManager, get_task_dict

        from pcbench.data.tasks import build_tasks

        what = f"the datasets of lm-eval tasks {', '.join(tasks)}"
        log(f"prepare: fetching {what}")
        tm = TaskManager(include_path=[str(build_tasks())] + ([include] if include else []), include_defaults=True)
        with _fetching(what):
            get_task_dict(tasks, tm)  # downloads each task's dataset into the datasets cache
    for hub_id in need["models"]:
        from huggingface_hub import snapshot_download

        log(f"prepare: fetching the weights of {hub_id}")
        with _fetching(f"the weights of {hub_id}"):
            snapshot_download(hub_id)
    return need


class _fetching:
    """Within: a failure to reach the hub is one line naming what was fetched (nothing was submitted)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or not isinstance(e, Exception) or isinstance(e, SpecError):
            return False
        msg = " ".join(str(e).split())[:300]
        raise SpecError("prepare", f"could not fetch {self.what} ({type(e).__name__}: {msg}); the jobs run with "
                        "the hub offline, so it is fetched before any job: give this machine hub access (or "
                        "its caches, HF_HOME / HF_DATASETS_CACHE), or leave those runs out (--only)") from None


class offline_jobs:
    """Within: the jobs started (local processes, sbatch submissions: they inherit the environment)
    run with the hub offline, everything having been fetched by the prepare stage."""

    def __enter__(self):
        import os

        self.saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
        os.environ.update(OFFLINE_ENV)
        return self

    def __exit__(self, *exc):
        import os

        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False
