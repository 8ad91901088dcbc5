"""Bad input and a hostile environment end as one line `pcbench: error: ...`, a non-zero exit and no
traceback, before any work starts (issue 9, classes 6, 7 and 10)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcbench.cli import main
from test_launch import tiny_grid

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> tuple[int, str, str]:
    """`pcbench ARGS` in this process: (exit code, stdout, stderr). An exception escaping `main` fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def cli_proc(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`pcbench ARGS` as its own process (the real entry point)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pcbench.cli", *map(str, args)], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def refused(rc: int, err: str, *needles: str) -> None:
    """A clean refusal: non-zero exit, no traceback, one error line holding every needle."""
    assert rc not in (0, None), err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("pcbench: error:") or "error:" in ln]
    assert lines, err
    for n in needles:
        assert any(n in ln for ln in lines), (n, err)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A tiny exported checkpoint (gpt2-nano, bpe-512), untrained: enough to compress and to refuse."""
    from pcbench.spec.config import ModelSpec
    from pcbench.models import build_config, build_model
    from pcbench.data.tokenizer import load_tokenizer
    from pcbench.train.loop import export_model

    tok = load_tokenizer("bpe-512")
    model = build_model(build_config(ModelSpec(name="gpt2-nano"), 512, 32, tok.bos_token_id, tok.eos_token_id))
    out = tmp_path_factory.mktemp("base") / "model"
    export_model(model, tok, out)
    return out


def compress_args(base, out, compression="0.5", *extra) -> list[str]:
    return ["compress", "--base", str(base), "--method", "hpr", "--compression", str(compression), "--steps", "0",
            "--out", str(out), "--seq-len", "32", "--eval-batches", "1", "--threads", "1", *extra]


def write_grid(tmp: Path, edit=None, name: str = "tiny") -> Path:
    """The tiny test grid of test_launch, edited by `edit(dict)`."""
    path = tiny_grid(tmp, name=name)
    if edit is not None:
        g = yaml.safe_load(path.read_text())
        edit(g)
        path.write_text(yaml.safe_dump(g, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Class 6: the environment


@pytest.mark.parametrize("compression,needle", [("0.001", "too small to remove anything"),
                                                ("0.99", "the most a plan can remove is 0.954"),
                                                ("1.5", "(0, 1)"), ("0", "(0, 1)"), ("-0.2", "(0, 1)")])
def test_compress_levels_out_of_reach_or_range(tmp_path, base_model, compression, needle):
    rc, _, err = cli(*compress_args(base_model, tmp_path / "out", compression))
    refused(rc, err, "--compression", needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.pcbench").exists()


def test_compress_bases_without_a_model(tmp_path, base_model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(base_model, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    for base, needle in ((tmp_path / "empty", "holds no model"), (tmp_path / "notes", "holds no model"),
                         (tmp_path / "nope", "does not exist"), (tmp_path / "file", "is a file"),
                         ("not-a-preset", "neither a checkpoint directory nor a preset"),
                         ("gpt2-nano", "neither a checkpoint directory nor a preset"),  # no weights
                         (no_tok, "tokenizer.json (missing)"),  # a pcbench model: its recorded files
                         (base_model.parent, "holds no model")):
        rc, _, err = cli(*compress_args(base, tmp_path / "out"))
        refused(rc, err, "--base", needle)
    assert not (tmp_path / "out").exists()


def test_a_file_where_a_directory_is_expected(tmp_path, base_model):
    f = tmp_path / "file"
    f.write_text("mine")
    grid = write_grid(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {name: gpt2-nano}\ndata: {tokenizer: bpe-512, seq_len: 32}\ntrain: {steps: 1}\n")
    for args, needle in (
            (["run", grid, "--results", f], "results directory"),
            (["run", grid, "--results", f / "sub"], "results directory"),
            (["run", grid, "--dry-run", "--results", f], "results directory"),
            (["run", grid, "--results", tmp_path / "r", "--work", f], "work directory"),
            (["status", grid, "--results", f], "results directory"),
            (["report", grid, "--results", f], "--results"),
            (["report", grid, "--results", ROOT / "results", "--out", f], "--out"),
            (["export", grid, "base-0", f, "--results", tmp_path / "r"], "OUT"),
            (["export", grid, "base-0", f / "x", "--results", tmp_path / "r"], "OUT"),
            (compress_args(base_model, f), "--out"),
            (compress_args(base_model, f / "sub"), "--out"),
            (["train", spec, "--out", f], "--out"),
            (["tasks", "--out", f], "--out")):
        rc, _, err = cli(*args)
        refused(rc, err, needle, str(f))
        assert f.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "spec.yaml", "tiny.yaml"]  # no FILE.tmpPID/


def _read_only(paths: list[Path]):
    """A command prefix that runs with `paths` read-only: private read-only bind mounts as root
    (root ignores permissions), chmod otherwise; None where neither works."""
    if os.geteuid() != 0:
        for path in paths:
            for p in [path, *path.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
        return []
    if shutil.which("unshare") is None:
        return None
    mounts = " && ".join(f"mount --bind '{p}' '{p}' && mount -o remount,bind,ro '{p}'" for p in paths)
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"{mounts} && ! touch '{paths[0]}/.probe' 2>/dev/null"], capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


def _completed_store(tmp_path: Path, grid_path: Path, base_model: Path):
    """Records saying every run of the grid completed (exports present): nothing left to run."""
    from pcbench.run import launch
    from pcbench.util.atomic import write_json
    from pcbench.grid import load_grid

    grid = load_grid(grid_path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    for run in grid.runs:
        store.write_run(run.record())
        write_json(store.paths(run.id).final, {"export_path": str(base_model), "train_loss_last100": 1.0})
        store.set_status(run.id, "completed")
    return grid, store


def test_read_only_results_dir(tmp_path, base_model):
    """Run refuses a read-only store in one line, with nothing left to run and with everything left;
    status still reads it. (One process for all three commands: each start costs seconds.)"""
    done, todo = tmp_path / "done", tmp_path / "todo"
    done.mkdir()
    todo.mkdir()
    grid_path = write_grid(done)
    _completed_store(done, grid_path, base_model)
    (todo / "results").mkdir()
    prefix = _read_only([done / "results", todo / "results"])
    if prefix is None:
        pytest.skip("cannot make a read-only directory here")
    before = {d: sorted(map(str, (d / "results").rglob("*"))) for d in (done, todo)}
    calls = [["run", grid_path, "--results", d / "results", "--work", d / "work"] for d in (done, todo)]
    calls.append(["status", grid_path, "--results", done / "results", "--work", done / "work"])
    script = ("import sys; from pcbench.cli import main\n"
              f"for args in {[[str(a) for a in c] for c in calls]!r}:\n"
              "    print('rc', main(args), flush=True); print('--end--', file=sys.stderr, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*prefix, sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    rcs = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("rc ")]
    errs = r.stderr.split("--end--")
    assert len(rcs) == 3 and "Traceback" not in r.stderr, r.stderr
    for rc, err, d in zip(rcs[:2], errs[:2], (done, todo)):
        refused(rc, err, str(d / "results"), "not writable")
    assert rcs[2] == 0, errs[2]  # reading a read-only store works
    assert {d: sorted(map(str, (d / "results").rglob("*"))) for d in (done, todo)} == before
    assert not (todo / "work").exists()


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device", "/data/x"),
                                 PermissionError(13, "Permission denied", "/data/x"),
                                 subprocess.CalledProcessError(1, ["sbatch", "/data/x"], stderr="sbatch: error: boom")])
def test_environment_errors_mid_command_are_one_line(monkeypatch, exc):
    """Whatever the file system or a tool refuses mid-command (a full disk, a permission) is one line naming it."""
    import pcbench.cli as cli_mod

    def fail(args):
        raise exc
    parser = cli_mod.build_parser
    monkeypatch.setattr(cli_mod, "build_parser", lambda: _with_fn(parser(), fail))
    rc, _, err = cli("tasks")
    refused(rc, err, "/data/x")
    assert len(err.strip().splitlines()) == 1


def test_an_asset_that_cannot_be_fetched_is_one_line_not_a_bug(monkeypatch):
    """An asset fetch that fails (npm missing, a sha256 mismatch) is the environment's: one line
    naming it, exit 1, never "(a bug)"."""
    import pcbench.cli as cli_mod
    from pcbench.data.assets import AssetError

    def fail(args):
        raise AssetError("asset 'gpt2-tokenizer': sha256 mismatch for /data/x.tgz")
    parser = cli_mod.build_parser
    monkeypatch.setattr(cli_mod, "build_parser", lambda: _with_fn(parser(), fail))
    rc, _, err = cli("tasks")
    refused(rc, err, "/data/x.tgz", "sha256 mismatch")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "a bug" not in err, err


def _with_fn(parser, fn):
    parser.set_defaults(fn=fn)
    for action in parser._subparsers._group_actions:
        for sp in action.choices.values():
            sp.set_defaults(fn=fn)
    return parser


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch):
    import pcbench.cli as cli_mod

    def bug(args):
        raise ZeroDivisionError("division by zero")
    parser = cli_mod.build_parser
    monkeypatch.setattr(cli_mod, "build_parser", lambda: _with_fn(parser(), bug))
    rc, _, err = cli("tasks")
    assert rc == 1 and "Traceback" not in err and "unexpected ZeroDivisionError" in err
    assert "PCBENCH_DEBUG=1" in err
    monkeypatch.setenv("PCBENCH_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["tasks"])


# ---------------------------------------------------------------------------------------------
# Class 7: found before the first job, and said by --dry-run


def _set(path: str, value):
    def edit(g):
        node = g
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return edit


def _eval_stage(tasks):
    def edit(g):
        g["stages"]["eval"] = {"kind": "eval", "from": "compress",
                               "spec": {"model": "run:${parent.id}", "tasks": tasks, "limit": 5}}
    return edit


@pytest.mark.parametrize("edit,needles", [
    (_eval_stage(["pcb_clozee"]), ["stages.eval.spec.tasks", "pcb_clozee", "did you mean"]),
    (_eval_stage(["pcb_cloze", "no_such_task_xyz"]), ["no_such_task_xyz"]),
    (_set("stages.compress.spec.model.path", "/nonexistent/model"), ["model.path", "/nonexistent/model",
                                                                     "does not exist"]),
    (_set("stages.compress.spec.model.path", "./models/missing"), ["does not exist"]),
    (_set("stages.compress.spec.model.path", "run:base-0123456789"), ["run:base-0123456789",
                                                                       "not a run of this grid"]),
    (_set("stages.compress.spec.compress.compression", 0.99), ["compress.compression", "0.954"]),
    (_set("stages.compress.spec.compress.compression", 0.001), ["too small to remove anything"]),
])
def test_known_before_training(tmp_path, edit, needles):
    grid = write_grid(tmp_path, edit)
    results = tmp_path / "results"
    rc, out, err = cli("run", grid, "--dry-run", "--results", results, "--work", tmp_path / "work")
    refused(rc, err, *needles)
    rc, out, err = cli("run", grid, "--results", results, "--work", tmp_path / "work")
    refused(rc, err, *needles)
    assert not results.exists() and not (tmp_path / "work").exists()  # nothing ran, nothing written


def test_a_model_path_in_a_folder_without_a_model(tmp_path):
    (tmp_path / "ckpt").mkdir()
    grid = write_grid(tmp_path, _set("stages.compress.spec.model.path", str(tmp_path / "ckpt")))
    rc, _, err = cli("run", grid, "--dry-run", "--results", tmp_path / "r")
    refused(rc, err, str(tmp_path / "ckpt"), "holds no model")


def test_dry_run_of_a_good_grid_says_the_checks_passed(tmp_path):
    grid = write_grid(tmp_path, _eval_stage(["pcb_cloze"]))
    rc, out, err = cli("run", grid, "--dry-run", "--results", tmp_path / "r")
    assert rc == 0 and "checks before the first job: ok" in out, err


# ---------------------------------------------------------------------------------------------
# Class 10: small things


@pytest.mark.parametrize("text,key,line", [
    ("name: a\nname: b\nstages: {}\n", "name", 2),
    ("name: a\nstages:\n  base:\n    spec: {}\n  base:\n    spec: {}\n", "base", 5),
    ("name: a\nstages: {base: {spec: {train: {steps: 1, steps: 2}}}}\n", "steps", 2),
])
def test_duplicate_yaml_keys(tmp_path, text, key, line):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    for cmd in (["run", p, "--dry-run"], ["status", p], ["train", p, "--out", tmp_path / "o"]):
        rc, _, err = cli(*cmd)
        refused(rc, err, f"duplicate key {key!r}", f"line {line}", f"{p}:{line}")


@pytest.mark.parametrize("text,number,line", [
    ("name: a\nstages: {base: {spec: {train: {steps: 010}}}}\n", "010", 2),  # octal: 8
    ("name: a\nstages: {base: {spec: {optim: {lr: 0x10}}}}\n", "0x10", 2),
    ("name: a\nstages: {base: {spec: {train: {seed: 0b11}}}}\n", "0b11", 2),
    ("name: a\nresources:\n  timeout_min: 1:30:00\nstages: {}\n", "1:30:00", 3),  # base 60: 5400
    ("name: a\nstages: {base: {spec: {optim: {lr: 1:30.5}}}}\n", "1:30.5", 2),
])
def test_numbers_yaml_1_1_reads_otherwise_refused(tmp_path, text, number, line):
    """YAML 1.1 reads these as other numbers than the digits say: refused, never trained on."""
    p = tmp_path / "g.yaml"
    p.write_text(text)
    for cmd in (["run", p, "--dry-run"], ["train", p, "--out", tmp_path / "o"]):
        rc, _, err = cli(*cmd)
        refused(rc, err, f"ambiguous number {number!r}", f"{p}:{line}")
    assert not (tmp_path / "o").exists()


def test_zero_padded_decimals_that_read_the_same_are_numbers():
    from pcbench.spec.config import _Loader
    assert yaml.load("a: 007\nb: 00\nc: 1_000\nd: '010'\ne: =\n", Loader=_Loader) == \
        {"a": 7, "b": 0, "c": 1000, "d": "010", "e": "="}


@pytest.mark.parametrize("flag,value", [("--gpus", "-1"), ("--cpus", "0"), ("--cpus", "-3"), ("--time", "0"),
                                        ("--time", "-5"), ("--nodes", "0"), ("--mem", "-1"), ("--mem", "0"),
                                        ("--mem", "nan"), ("--gpus", "one")])
def test_impossible_resources_refused(tmp_path, flag, value):
    grid = write_grid(tmp_path)
    rc, _, err = cli("run", grid, "--dry-run", flag, value, "--results", tmp_path / "r")
    refused(rc, err, flag)


@pytest.mark.parametrize("field,value", [("cpus_per_task", 0), ("nodes", 0), ("timeout_min", 0),
                                         ("gpus_per_node", -1), ("mem_gb", -2)])
def test_impossible_resources_in_the_grid_refused(tmp_path, field, value):
    grid = write_grid(tmp_path, _set(f"resources.{field}", value))
    rc, _, err = cli("run", grid, "--dry-run", "--results", tmp_path / "r")
    refused(rc, err, f"resources.{field}")


def test_the_real_entry_point(tmp_path, base_model):
    """Refusals through `python -m pcbench.cli` itself (each process start costs seconds: two)."""
    f = tmp_path / "file"
    f.write_text("x")
    grid = write_grid(tmp_path, _set("stages.compress.spec.compress.compression", 0.99))
    for args, needle in ((compress_args(base_model, f), "is a file"),
                         (["run", grid, "--dry-run", "--results", tmp_path / "r"], "0.954")):
        r = cli_proc(*args)
        refused(r.returncode, r.stderr, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny.yaml"]


# ---------------------------------------------------------------------------------------------
# Class 6: SLURM refusals, all or nothing


@pytest.mark.slurm
@pytest.mark.parametrize("where,res,needle", [
    ("cli", ["--partition", "no_such_partition"], "Invalid partition"),
    ("cli", ["--cpus", "64"], "More processors requested than permitted"),
    ("compress", {"partition": "no_such_partition"}, "Invalid partition"),  # a later stage only
    ("compress", {"cpus_per_task": 64}, "More processors requested"),
])
def test_sbatch_refusals_submit_nothing(tmp_path, slurm_cluster, monkeypatch, where, res, needle):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    edit = None if where == "cli" else _set("stages.compress.resources", res)
    grid = write_grid(tmp_path, edit, name=f"sb{os.getpid()}")
    extra = res if where == "cli" else []
    for dry in (["--dry-run"], []):
        rc, _, err = cli("run", grid, "--executor", "slurm", "--results", tmp_path / "r",
                         "--work", tmp_path / "w", *extra, *dry)
        refused(rc, err, "sbatch refuses", needle, "resources" if where == "cli" else "stages.compress")
    assert not (tmp_path / "r").exists()  # no run was marked submitted: nothing went to sbatch
    assert not (tmp_path / "w").exists()


@pytest.mark.slurm
@pytest.mark.parametrize("where", ["cli", "grid"])
def test_cuda_runs_asking_for_no_gpu_submit_nothing(tmp_path, slurm_cluster, monkeypatch, where):
    """Runs on cuda (train.device) with 0 GPUs (--gpus 0, or the stage's resources) would each fail
    on a node without one: one line naming the field, before anything is submitted."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))

    def edit(g):
        g["defaults"]["train"]["device"] = "cuda"
        if where == "grid":
            g["stages"]["compress"].setdefault("resources", {})["gpus_per_node"] = 0

    grid = write_grid(tmp_path, edit, name=f"gpu{os.getpid()}")
    extra = ["--gpus", "0"] if where == "cli" else []
    for dry in (["--dry-run"], []):
        rc, _, err = cli("run", grid, "--executor", "slurm", "--results", tmp_path / "r",
                         "--work", tmp_path / "w", *extra, *dry)
        refused(rc, err, "gpus_per_node", "train.device: cuda")
        assert rc == 2 and len(err.strip().splitlines()) <= 2, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


@pytest.mark.slurm
def test_sbatch_accepts_a_good_request(tmp_path, slurm_cluster):
    """The same check passes a request the cluster can run (partition debug, 1 CPU)."""
    grid = write_grid(tmp_path)
    rc, out, err = cli("run", grid, "--executor", "slurm", "--dry-run", "--results", tmp_path / "r")
    assert rc == 0 and "checks before the first job: ok" in out, err


@pytest.mark.parametrize("cmd", ["eval", "compress", "train"])
def test_damaged_pcbench_model_named_as_input_is_bad_input(tmp_path, base_model, cmd):
    """A flipped byte in a pcbench model (whole otherwise: same size, valid header) named on the
    command line or in a train spec: refused before any work as bad input (exit 2), naming the file."""
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    if cmd == "eval":
        rc, out, err = cli("eval", model, "--limit", "2")
    elif cmd == "compress":
        rc, out, err = cli(*compress_args(model, tmp_path / "out"))
    else:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"model": {"name": "hf", "path": str(model)}, "data": {"tokenizer": "model"},
                                        "train": {"steps": 2}}))
        rc, out, err = cli("train", spec, "--out", tmp_path / "out")
    assert rc == 2, err
    refused(rc, err, f"{weights} (sha256 mismatch)")
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_dry_run_creates_no_work_directory(tmp_path, monkeypatch):
    """`run --dry-run` touches nothing: $PCBENCH_WORK (missing) is checked, not created; a work root
    that could not be created is still named."""
    grid = write_grid(tmp_path)
    work = tmp_path / "deep" / "work"
    monkeypatch.setenv("PCBENCH_WORK", str(work))
    rc, out, err = cli("run", grid, "--dry-run", "--results", tmp_path / "results")
    assert rc == 0, err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "results").exists()
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    monkeypatch.setenv("PCBENCH_WORK", str(afile / "work"))
    rc, out, err = cli("run", grid, "--dry-run", "--results", tmp_path / "results")
    refused(rc, err, "PCBENCH_WORK", "lies under a file")
