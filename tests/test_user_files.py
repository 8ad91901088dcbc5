"""Files outside pcbench's own outputs survive every command that writes (issue 9, class 1 and
Done-when 4): compress, export, report, run, train, tasks. A non-empty target that is not a pcbench
output of the same kind is refused with one line; `--force` replaces only pcbench's own files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pcbench.util import outputs
from test_cli_errors import _completed_store, base_model, cli, cli_proc, compress_args, refused, write_grid  # noqa: F401
from test_report import GRID, make_store

SENTINELS = {"paper.tex": b"\\documentclass{article} my paper\n", "notes/todo.md": b"- finish\n",
             "config.json": b'{"mine": true}\n', "figures/mine.png": b"\x89PNG user figure",
             "tables/mine.csv": b"a,b\n1,2\n", "REPORT.md": b"# my own report\n"}


def plant(d: Path, names=SENTINELS) -> dict[str, str]:
    """User files under `d`; returns their hashes (see `unchanged`)."""
    for rel, data in names.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return snapshot(d, names)


def snapshot(d: Path, names) -> dict[str, str]:
    return {rel: hashlib.sha256((d / rel).read_bytes()).hexdigest() for rel in names}


def unchanged(d: Path, before: dict[str, str]) -> None:
    assert snapshot(d, before) == before


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# ---------------------------------------------------------------------------------------------
# compress


@pytest.mark.parametrize("force", [False, True])
def test_compress_refuses_a_folder_of_user_files(tmp_path, base_model, force):
    target = tmp_path / "work"
    before = plant(target)
    listing = tree(tmp_path)
    rc, _, err = cli(*compress_args(base_model, target, "0.5", *(["--force"] if force else [])))
    refused(rc, err, "--out", str(target), "not a pcbench model")
    unchanged(target, before)
    assert tree(tmp_path) == listing  # no temp dir, no state dir left beside it


def test_compress_out_dot_in_a_folder_holding_a_paper(tmp_path, base_model):
    before = plant(tmp_path)
    r = cli_proc(*compress_args(base_model, "."), cwd=tmp_path)
    refused(r.returncode, r.stderr, "--out", "not a pcbench model")
    unchanged(tmp_path, before)
    assert not (tmp_path.parent / f"{tmp_path.name}.pcbench").exists()


def test_compress_writes_beside_user_files_and_force_replaces_only_its_own(tmp_path, base_model):
    before = plant(tmp_path, {"paper.tex": SENTINELS["paper.tex"]})
    out = tmp_path / "model"
    rc, _, err = cli(*compress_args(base_model, out))
    assert rc == 0, err
    assert outputs.read_marker(out)["kind"] == "model"
    unchanged(tmp_path, before)
    mine = plant(out, {"MY_NOTES.txt": b"keep me\n"})  # a user file inside pcbench's model
    rc, _, err = cli(*compress_args(base_model, out))
    refused(rc, err, "already holds a pcbench model", "--force")
    old = (out / "model.safetensors").read_bytes()
    rc, _, err = cli(*compress_args(base_model, out, "0.35", "--force"))
    assert rc == 0, err
    unchanged(out, mine)
    unchanged(tmp_path, before)
    assert (out / "model.safetensors").read_bytes() != old  # replaced: another level
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_export_model_refuses_foreign_targets_and_cleans_up(tmp_path, base_model):
    """`train.export_model` (every run's export): never into someone else's folder, no temp dir left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pcbench.train.loop import export_model

    model, tok = AutoModelForCausalLM.from_pretrained(base_model), AutoTokenizer.from_pretrained(base_model)
    target = tmp_path / "t"
    before = plant(target)
    with pytest.raises(outputs.OutputError, match="not a pcbench model"):
        export_model(model, tok, target)
    unchanged(target, before)
    f = tmp_path / "file"
    f.write_text("x")
    for bad in (f, f / "sub"):
        with pytest.raises(outputs.OutputError, match="is a file"):
            export_model(model, tok, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "t"]

    class Boom(RuntimeError):
        pass

    def fail(*a, **k):
        raise Boom()
    tok.save_pretrained = fail  # a failure half-way: the temp dir goes, the target is untouched
    with pytest.raises(Boom):
        export_model(model, tok, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "t"]


# ---------------------------------------------------------------------------------------------
# export


def test_export_refuses_user_folders_and_replaces_only_its_own_files(tmp_path, base_model):
    grid_path = write_grid(tmp_path)
    grid, store = _completed_store(tmp_path, grid_path, base_model)
    rid = grid.runs[0].id
    common = ["--results", tmp_path / "results", "--work", tmp_path / "work"]
    target = tmp_path / "mine"
    before = plant(target)
    for force in ([], ["--force"]):
        rc, _, err = cli("export", grid_path, rid, target, *common, *force)
        refused(rc, err, "OUT", "not a pcbench model")
        unchanged(target, before)
    out = tmp_path / "exported"
    rc, _, err = cli("export", grid_path, rid, out, *common)
    assert rc == 0, err
    assert (out / "model.safetensors").read_bytes() == (base_model / "model.safetensors").read_bytes()
    mine = plant(out, {"README.md": b"my notes on this model\n"})
    rc, _, err = cli("export", grid_path, rid, out, *common)
    refused(rc, err, "already holds a pcbench model")
    rc, _, err = cli("export", grid_path, rid, out, *common, "--force")
    assert rc == 0, err
    unchanged(out, mine)
    rc, _, err = cli("export", grid_path, "base-0000000000", tmp_path / "x", *common)
    refused(rc, err, "not a run of grid")


# ---------------------------------------------------------------------------------------------
# report


def _report(tmp_path: Path, out_root: Path):
    return cli("report", GRID, "--results", tmp_path / "results", "--out", out_root)


def test_report_refuses_a_user_folder_at_its_place(tmp_path):
    make_store(tmp_path / "results")
    out_root = tmp_path / "figs"
    before = plant(out_root / GRID)
    rc, _, err = _report(tmp_path, out_root)
    refused(rc, err, "--out", "not a pcbench report")
    unchanged(out_root / GRID, before)


def test_report_keeps_user_files_next_to_its_own_and_drops_only_its_stale_ones(tmp_path):
    make_store(tmp_path / "results")
    out_root = tmp_path / "figs"
    beside = plant(out_root, {"paper.tex": SENTINELS["paper.tex"]})
    rc, _, err = _report(tmp_path, out_root)
    assert rc == 0, err
    out = out_root / GRID
    marker = outputs.read_marker(out)
    assert marker["kind"] == "report" and "REPORT.md" in marker["files"]
    own = set(marker["files"])
    user = {k: v for k, v in SENTINELS.items() if k != "REPORT.md" and k not in own}
    assert "figures/mine.png" in user and "tables/mine.csv" in user
    mine = plant(out, user)
    # An older version's own file, no longer made: listed in the marker, so it is replaced (dropped).
    (out / "tables" / "old_table.md").write_text("old")
    outputs.write_marker(out, "report", sorted(own | {"tables/old_table.md"}))
    first = {f: (out / f).read_bytes() for f in own}
    rc, _, err = _report(tmp_path, out_root)
    assert rc == 0, err
    unchanged(out, mine)
    unchanged(out_root, beside)
    assert not (out / "tables" / "old_table.md").exists()
    assert {f: (out / f).read_bytes() for f in own} == first  # same store, same bytes
    assert not [p for p in out_root.iterdir() if ".tmp" in p.name]


def test_report_over_a_report_of_an_older_pcbench(tmp_path):
    """An unmarked report (REPORT.md with pcbench's heading): its linked files are its own."""
    make_store(tmp_path / "results")
    out = tmp_path / "figs" / GRID
    out.mkdir(parents=True)
    (out / "REPORT.md").write_text("# pcbench report: grid `toy`\n\n![x](figures/retired.png)\n")
    (out / "figures").mkdir()
    (out / "figures" / "retired.png").write_bytes(b"old figure")
    mine = plant(out, {"figures/mine.png": SENTINELS["figures/mine.png"], "notes.txt": b"mine\n"})
    rc, _, err = _report(tmp_path, tmp_path / "figs")
    assert rc == 0, err
    unchanged(out, mine)
    assert not (out / "figures" / "retired.png").exists()
    assert outputs.read_marker(out)["kind"] == "report"


# ---------------------------------------------------------------------------------------------
# run, train, tasks


@pytest.mark.parametrize("where", ["results", "work"])
def test_run_refuses_user_folders_as_its_store(tmp_path, where):
    from pcbench.grid import load_grid
    from pcbench.run.launch import store_for

    grid = write_grid(tmp_path)
    roots = {"results": tmp_path / "results", "work": tmp_path / "work"}
    store = store_for(load_grid(grid), str(roots["results"]), str(roots["work"]))
    target = store.root if where == "results" else store.work
    before = plant(target)
    rc, _, err = cli("run", grid, "--only", "stage=base", "--results", roots["results"], "--work", roots["work"])
    refused(rc, err, f"{where} directory", str(target))
    unchanged(target, before)
    assert tree(target.parent) == sorted([target.name, *(str(Path(target.name) / p) for p in tree(target))])
    other = roots["work" if where == "results" else "results"]
    assert not other.exists()  # nothing created before the refusal


def test_run_writes_beside_user_files(tmp_path):
    grid = write_grid(tmp_path, lambda g: g["stages"]["base"]["spec"]["train"].update(steps=3))
    results, work = tmp_path / "results", tmp_path / "work"
    a = plant(results, {"paper.tex": SENTINELS["paper.tex"], "other_grid/runs.csv": b"x\n"})
    b = plant(work, {"notes/todo.md": SENTINELS["notes/todo.md"]})
    rc, _, err = cli("run", grid, "--only", "stage=base", "--results", results, "--work", work)
    assert rc == 0, err
    unchanged(results, a)
    unchanged(work, b)
    assert outputs.read_marker(results / "tiny")["kind"] == "results"
    assert [outputs.kind_of(p) for p in work.iterdir() if p.name.startswith("tiny")] == ["work"]
    rc, _, err = cli("run", grid, "--only", "stage=base", "--results", results, "--work", work)
    assert rc == 0, err  # a pcbench store of the same kind: fine, nothing to do


def test_train_and_tasks_refuse_user_folders(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {name: gpt2-nano}\ndata: {tokenizer: bpe-512, seq_len: 32}\ntrain: {steps: 1}\n")
    for cmd, kind in ((["train", spec, "--out"], "`pcbench train` output"), (["tasks", "--out"], "task suite")):
        target = tmp_path / cmd[0]
        before = plant(target)
        rc, _, err = cli(*cmd, target)
        refused(rc, err, "--out", kind)
        unchanged(target, before)


def test_kind_recognition_of_older_outputs(tmp_path):
    """Outputs written before markers are recognised from their contents; anything else is not pcbench's."""
    (tmp_path / "store" / "runs" / "base-0123456789").mkdir(parents=True)
    (tmp_path / "work" / "base-0123456789" / "ckpt").mkdir(parents=True)
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "suite.json").write_text(json.dumps({"key": "x"}))
    (tmp_path / "t" / "record").mkdir(parents=True)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert [outputs.kind_of(tmp_path / n) for n in ("store", "work", "suite", "t", "user", "empty", "none")] == \
        ["results", "work", "tasks", "train", None, "", ""]


def _ensure(args):
    from pcbench.util.outputs import ensure_dir

    path, kind = args
    try:
        ensure_dir(path, kind, "--out")
        return None
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"


def test_processes_creating_one_output_at_once_all_succeed(tmp_path):
    """Two ranks (or two launchers) create the same output directory at the same moment: the one
    that comes second sees the first's marker being written, not a user's file, and goes on."""
    import multiprocessing as mp

    from pcbench.util.outputs import kind_of

    with mp.get_context("fork").Pool(8) as pool:
        for i in range(20):
            errors = [e for e in pool.map(_ensure, [(str(tmp_path / f"out{i}"), "train")] * 8) if e]
            assert errors == [], errors
            assert kind_of(tmp_path / f"out{i}") == "train"


def test_a_marker_in_flight_is_not_a_users_file(tmp_path):
    from pcbench.util.outputs import OutputError, claim, kind_of

    d = tmp_path / "d"
    d.mkdir()
    (d / "..pcbench.json.0123456789ab.tmp").write_text("{")
    assert kind_of(d) == "" and claim(d, "train", "--out") == d
    (d / ".pcbench.json.tmp").write_text("mine")  # not pcbench's temp name: a user's file
    assert kind_of(d) is None
    with pytest.raises(OutputError):
        claim(d, "train", "--out")
