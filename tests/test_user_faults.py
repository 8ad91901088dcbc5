"""Faults a user meets (issue 23, item 4): half-done work left behind, errors that blame pcbench or
nobody, non-finite numbers. (The launcher's word, SIGHUP and a killed fork server, is in
tests/test_faults.py beside the other signal faults: it shares their reference run.)

Each class is tried with several inputs; each input asserts one line (no traceback), the right exit
code (2 bad input, 1 the environment), nothing a user owns lost and no number recorded wrongly;
where work was cut short, the next plain writer finishes it with the bytes a clean one makes and
removes what the dead one left."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcbench.util import atomic, outputs
from test_cli_errors import _completed_store, base_model, cli, refused, write_grid  # noqa: F401
from test_report import GRID, make_store

ROOT = Path(__file__).resolve().parents[1]


def digest(d: Path) -> dict[str, str]:
    """Every file under `d` (relative path -> sha256)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def one_error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("pcbench: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def in_child(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Python `code` in a fresh process with this worktree on the path (it may die hard)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=600)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".old")))


def dead_writers_temp(target: Path) -> Path:
    """A temp dir of `target` as a writer on this host whose pid is gone would have left it."""
    pid = (1 << 22) + 5  # above any pid_max: no such process
    tmp = target.parent / f".{target.name}.{atomic._HOST}.{pid}.{'ab' * 6}.tmp"
    (tmp / "tables").mkdir(parents=True)
    (tmp / "REPORT.md").write_text("half\n")
    return tmp


# ---------------------------------------------------------------------------------------------
# Half-done work left behind


KILL_REPORT = """
import os, sys
from pathlib import Path
from pcbench.report import build_report
from pcbench.util import atomic
how, results, out = os.environ["ARGS"].split("|")
if how == "installing":
    atomic.replace_dir = lambda *a: os._exit(9)  # killed between the finished build and the swap
def say(m):
    if how == "drawing" and m.startswith("figure"):
        os._exit(9)  # killed while drawing
build_report(Path(results), "toy", Path(out), progress=say)
"""


@pytest.mark.parametrize("how", ["drawing", pytest.param("installing", marks=pytest.mark.slow)])  # ~50 s each
def test_report_killed_leaves_the_old_report_whole_and_the_next_one_cleans_up(tmp_path, how):
    results, out_root = tmp_path / "results", tmp_path / "figs"
    make_store(results)
    fresh = tmp_path / "fresh"
    rc, _, err = cli("report", GRID, "--results", results, "--out", fresh)
    assert rc == 0, err
    clean = digest(fresh / GRID)
    # An older report of the same store (different numbers) with a user's file beside its own.
    make_store(tmp_path / "other", swap=True)
    rc, _, err = cli("report", GRID, "--results", tmp_path / "other", "--out", out_root)
    assert rc == 0, err
    out = out_root / GRID
    (out / "notes.md").write_text("mine\n")
    (out / "tables" / "mine.csv").write_text("a\n1\n")
    old = digest(out)
    p = in_child(KILL_REPORT, {"ARGS": f"{how}|{results}|{out_root}"})
    assert p.returncode == 9, p.stderr[-2000:]
    assert digest(out) == old  # the old report, whole: no new REPORT.md beside old tables, same marker
    assert leftovers(out_root), "the dead writer's temp dir is there"
    rc, _, err = cli("report", GRID, "--results", results, "--out", out_root)
    assert rc == 0, err
    now = digest(out)
    assert {k: v for k, v in now.items() if k not in ("notes.md", "tables/mine.csv")} == clean
    assert now["notes.md"] == old["notes.md"] and now["tables/mine.csv"] == old["tables/mine.csv"]
    assert leftovers(out_root) == []  # the dead writer's temp dir removed by the next writer


def test_a_live_writers_temp_dir_is_left_alone(tmp_path):
    target = tmp_path / "out"
    mine = atomic.temp_dir(target)  # this process: alive
    dead = dead_writers_temp(target)
    other_host = tmp_path / f".out.otherhost.{os.getpid()}.{'cd' * 6}.tmp"
    other_host.mkdir()
    removed = atomic.sweep_temps(target)
    assert removed == [dead] and mine.is_dir() and other_host.is_dir()


@pytest.mark.slow  # ~30 s on a shared 2-core machine (tokenising, twice)
def test_token_store_without_meta_is_rebuilt_not_a_blocker(tmp_path, monkeypatch):
    """A store whose meta.json was lost (and a dead writer's temp dir beside it) is replaced by the
    next `prepare_tokens`, with the same tokens a clean build gives."""
    from pcbench.data import tokens

    from pcbench.util.paths import cache_dir

    real = cache_dir()
    monkeypatch.setenv("PCBENCH_CACHE", str(tmp_path / "cache"))
    cache_dir()
    if (real / "assets").is_dir():  # the corpus and the tokenizer are not what is tried here
        (tmp_path / "cache" / "assets").symlink_to(real / "assets")
    if (real / "tokenizers").is_dir():
        shutil.copytree(real / "tokenizers", tmp_path / "cache" / "tokenizers", ignore=shutil.ignore_patterns("*.lock", ".*"))
    monkeypatch.setattr(tokens, "DOCS_PER_CALL", 2)  # a few documents suffice
    args = dict(corpus="sotu", tokenizer="bpe-512", split="test", tokenizer_corpus="books", max_tokens=3000)
    first = tokens.prepare_tokens(**args)
    want = bytes(first.tokens)
    path = first.path
    del first
    (path / "meta.json").unlink()  # lost
    dead = dead_writers_temp(path)
    again = tokens.prepare_tokens(**args)
    assert again.path == path and bytes(again.tokens) == want
    assert not dead.exists() and leftovers(path.parent) == []


@pytest.mark.parametrize("where", ["state", "manifest"])
def test_checkpoint_on_a_full_disk_leaves_nothing_and_the_next_save_cleans_up(tmp_path, monkeypatch, where):
    import torch

    from pcbench.train import checkpoint

    root = tmp_path / "ckpt"
    checkpoint.save(root, 5, {"w": torch.ones(3)})
    (root / ".step_00000010.tmp4194309").mkdir()  # a dead writer's (killed mid-write)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "state":
        monkeypatch.setattr(os, "fsync", full)
    else:
        monkeypatch.setattr("pcbench.train.checkpoint.write_json", full)
    with pytest.raises(OSError) as e:
        checkpoint.save(root, 10, {"w": torch.zeros(3)})
    assert e.value.errno == errno.ENOSPC and "step_00000010" in str(e.value.filename)
    monkeypatch.undo()
    assert [p.name for p in root.iterdir()] == ["step_00000005"]  # nothing half-written, old one kept
    checkpoint.save(root, 10, {"w": torch.zeros(3)})
    assert [p.name for p in sorted(root.iterdir())] == ["step_00000005", "step_00000010"]
    assert torch.equal(checkpoint.load(root / "step_00000010")["w"], torch.zeros(3))


EXPORT_KILLED = """
import os, sys
from pcbench.util import atomic
atomic.replace_dir = lambda *a: os._exit(9)
from pcbench.cli import main
sys.exit(main(os.environ["ARGS"].split("|")))
"""


def test_export_killed_while_installing_keeps_the_old_export_whole(tmp_path, base_model):
    grid, store = _completed_store(tmp_path, write_grid(tmp_path), base_model)
    rid = grid.runs[0].id
    out = tmp_path / "exported"
    rc, _, err = cli("export", grid.source, "--results", tmp_path / "results", "--work", tmp_path / "work", rid, out)
    assert rc == 0, err
    (out / "README.md").write_text("my notes\n")
    (out / "config.json").write_text('{"old": 1}')  # pcbench's own file, as an older export had it
    old = digest(out)
    args = ["export", str(grid.source), "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work"),
            rid, str(out), "--force"]
    p = in_child(EXPORT_KILLED, {"ARGS": "|".join(args)})
    assert p.returncode == 9, p.stderr[-2000:]
    assert digest(out) == old and leftovers(tmp_path)
    rc, _, err = cli(*args)
    assert rc == 0, err
    assert (out / "README.md").read_text() == "my notes\n"
    assert (out / "config.json").read_bytes() == (base_model / "config.json").read_bytes()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Errors that blame pcbench or nobody: one line naming the file or the variable


def _latin1(tmp: Path) -> Path:
    path = write_grid(tmp)
    path.write_bytes(path.read_bytes().replace(b"name: tiny", b"name: tiny  # caf\xe9", 1))
    return path


def _damaged_model(tmp: Path, base: Path, name: str, size: int) -> Path:
    d = tmp / "model"
    shutil.copytree(base, d)
    with open(d / name, "r+b") as f:
        f.truncate(size)
    return d


@pytest.mark.parametrize("case", ["latin1-run", "latin1-report", "latin1-status", "safetensors-eval",
                                  "safetensors-compress", "safetensors-grid", "tokenizer-eval", "config-compress",
                                  "header-eval"])
def test_damaged_or_foreign_files_are_named(tmp_path, base_model, case):
    what, cmd = case.split("-")
    results = tmp_path / "results"
    if what == "latin1":
        path = _latin1(tmp_path)
        before = path.read_bytes()
        args = {"run": ["run", path, "--dry-run", "--results", results],
                "report": ["report", path, "--results", results, "--out", tmp_path / "figs"],
                "status": ["status", path, "--results", results]}[cmd]
        rc, out, err = cli(*args)
        assert rc == 2
        one_error_line(err, str(path), "UTF-8", "0xe9")
        assert path.read_bytes() == before and not results.exists()
        return
    name, size = {"safetensors": ("model.safetensors", 5000), "tokenizer": ("tokenizer.json", 100),
                  "config": ("config.json", 20), "header": ("model.safetensors", 6)}[what]
    model = _damaged_model(tmp_path, base_model, name, size)
    before = digest(model)
    if cmd == "eval":
        rc, out, err = cli("eval", model, "--limit", "2")
    elif cmd == "compress":
        rc, out, err = cli("compress", "--base", model, "--method", "hpr", "--compression", "0.5", "--steps", "0",
                           "--out", tmp_path / "out", "--seq-len", "32")
        assert not (tmp_path / "out").exists()
    else:
        def edit(g):
            g["stages"] = {"ft": {"spec": {"model": {"name": "hf", "path": str(model)}, "data": {"tokenizer": "model"},
                                           "train": {"steps": 2}}}}
        rc, out, err = cli("run", write_grid(tmp_path, edit), "--results", results, "--work", tmp_path / "work")
        assert not (results / "tiny" / "runs").exists() or not any((results / "tiny" / "runs").iterdir())
    assert rc == 2, err
    one_error_line(err, str(model / name))
    assert digest(model) == before  # the user's files as they were


@pytest.mark.parametrize("var,how", [("PCBENCH_WORK", "file"), ("PCBENCH_WORK", "under-file"),
                                     ("PCBENCH_CACHE", "file"), ("PCBENCH_DATA_FILES", "json")])
def test_bad_environment_variables_are_named(tmp_path, monkeypatch, var, how):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    value = {"file": str(afile), "under-file": str(afile / "work"), "json": "{not json"}[how]
    monkeypatch.setenv(var, value)
    monkeypatch.delenv("PCBENCH_WORK", raising=False) if var == "PCBENCH_CACHE" else None
    if var == "PCBENCH_DATA_FILES":
        from pcbench.data import corpora

        with pytest.raises(Exception) as e:
            corpora._override("books", None)
        assert type(e.value).__name__ == "SpecError" and str(e.value).startswith("PCBENCH_DATA_FILES:")
        return
    results = tmp_path / "results"
    rc, out, err = cli("run", write_grid(tmp_path), "--results", results)
    assert rc == 2, err
    one_error_line(err, var, str(afile))
    assert "File exists" not in err and afile.read_text() == "mine\n" and not results.exists()


@pytest.mark.parametrize("how", ["copy", "marker"])
def test_export_on_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, base_model, monkeypatch, how):
    grid, store = _completed_store(tmp_path, write_grid(tmp_path), base_model)
    rid = grid.runs[0].id
    out = tmp_path / "exported"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if how == "copy":
        monkeypatch.setattr(shutil, "copyfile", full)  # copytree's copy of each file
    else:
        monkeypatch.setattr(os, "fsync", full)
    before = digest(base_model)
    rc, _, err = cli("export", grid.source, "--results", tmp_path / "results", "--work", tmp_path / "work", rid, out)
    assert rc == 1, err
    one_error_line(err, "No space left on device", str(out) if how == "copy" else "exported")
    assert not out.exists() and leftovers(tmp_path) == [] and digest(base_model) == before


# ---------------------------------------------------------------------------------------------
# Small: non-finite numbers


def _refused_by_the_dry_run(tmp_path, path, g: dict, value: str, key: str) -> None:
    """The grid `g` with its "@@" set to `value` (YAML as written): `run --dry-run` refuses it in one
    line naming `key`, rc 2, and creates no results."""
    path.write_text(yaml.safe_dump(g, sort_keys=False).replace("'@@'", value))
    results = tmp_path / "results"
    rc, out, err = cli("run", path, "--dry-run", "--results", results)
    assert rc == 2, (key, value, out, err)
    one_error_line(err, key)
    assert not results.exists()


@pytest.mark.parametrize("field,value", [("optim.lr", ".inf"), ("optim.lr", "-.inf"), ("optim.lr", ".nan"),
                                         ("optim.weight_decay", ".inf"), ("optim.grad_clip", ".inf"),
                                         ("optim.warmup", ".inf"), ("compress.compression", ".inf"),
                                         ("compress.distill", ".nan"), ("resources.mem_gb", ".inf"),
                                         ("resources.gpu_mem_gb", ".inf")])
def test_non_finite_numbers_in_a_grid_are_refused(tmp_path, field, value):
    section, key = field.split(".")
    path = write_grid(tmp_path)
    text = path.read_text()
    g = yaml.safe_load(text)
    if section == "resources":
        g["resources"][key] = "@@"
    elif section == "compress":
        g["stages"]["compress"]["spec"]["compress"][key] = "@@"
    else:
        g["defaults"]["optim"][key] = "@@"
    _refused_by_the_dry_run(tmp_path, path, g, value, key)


@pytest.mark.parametrize("field,value", [("optim.eps", "-1"), ("optim.eps", "0"), ("optim.eps", "1e-400"),
                                         ("train.seed", "-1"), ("train.seed", "4294967296"),
                                         ("train.data_seed", "-1"), ("compress.importance_seed", "-1")])
def test_numbers_the_job_would_refuse_are_refused_before_it(tmp_path, field, value):
    """An AdamW eps <= 0 (torch refuses < 0; 0 gives a NaN loss at step 1) or a seed numpy refuses
    failed inside each job, after `--dry-run` said the checks were ok."""
    section, key = field.split(".")
    path = write_grid(tmp_path)
    g = yaml.safe_load(path.read_text())
    if section == "compress":
        g["stages"]["compress"]["spec"]["compress"][key] = "@@"
    else:
        g["defaults"].setdefault(section, {})[key] = "@@"
    _refused_by_the_dry_run(tmp_path, path, g, value, key)


BASE_SPEC = {"model": {"name": "gpt2-nano"}, "data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32},
             "train": {"steps": 1, "batch_size": 8, "threads": 1, "device": "cpu"}, "optim": {"lr": 0.01}}


@pytest.mark.parametrize("field,value,needle", [
    ("train.threads", "99999999999999999999", "64 bits"), ("train.threads", "100000", "at most 4,096"),
    ("model.pad_vocab", "99999999999999999999", "64 bits"), ("model.pad_vocab", "4194304", "at most"),
    ("model.d_model", "1099511627776", "at most"), ("model.layers", "1099511627776", "at most"),
    ("data.seq_len", "1099511627776", "at most"), ("train.batch_size", "1099511627776", "at most"),
    ("train.micro_batch_size", "99999999999999999999", "64 bits"), ("train.steps", "1000000000000000", "tokens"),
    ("train.log_every", "-99999999999999999999", "64 bits"), ("compress.align", "99999999999999999999", "64 bits")])
def test_integers_torch_or_numpy_would_overflow_on_are_refused(tmp_path, field, value, needle):
    """An integer past a C long long (or past what torch can size) reached torch inside the job:
    'unexpected ValueError: Overflow when unpacking long long (a bug)' or a C++ stack trace, after the
    output directory was made. Now one line naming the field, rc 2, nothing created."""
    section, key = field.split(".")
    spec = yaml.safe_load(yaml.safe_dump(BASE_SPEC))
    if section == "compress":
        spec["model"] = {"name": "hf", "path": str(tmp_path)}
        spec["compress"] = {"method": "hpr"}
    spec[section][key] = "@@"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False).replace("'@@'", value))
    rc, out, err = cli("train", path, "--out", tmp_path / "o")
    assert rc == 2, (field, value, out, err)
    one_error_line(err, f"{field}", needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,needle", [("", "empty spec"), ("~\n", "empty spec"), ("# nothing\n", "empty spec"),
                                         ("@@lr: '1_0'", "optim.lr: must be a number, got '1_0'"),
                                         ("@@lr: ' 1'", "optim.lr: must be a number"),
                                         ("@@lr: '0x1p-3'", "optim.lr: must be a number")])
def test_empty_specs_and_numbers_in_quotes_are_refused(tmp_path, text, needle):
    """An empty spec file trained a 100-step default model (rc 0); a quoted `'1_0'` went through
    float() and trained at lr 10."""
    if text.startswith("@@"):
        spec = yaml.safe_load(yaml.safe_dump(BASE_SPEC))
        spec["optim"]["lr"] = "@@"
        text = yaml.safe_dump(spec, sort_keys=False).replace("lr: '@@'", text[2:])
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    rc, out, err = cli("train", path, "--out", tmp_path / "o")
    assert rc == 2, (text, out, err)
    one_error_line(err, needle)
    assert not (tmp_path / "o").exists()


def test_a_quoted_plain_decimal_is_still_a_number(tmp_path):
    """A template's result ("1e-${k}") is a string: a plain decimal there is read as the number."""
    from pcbench.spec.config import load_run_spec

    spec = yaml.safe_load(yaml.safe_dump(BASE_SPEC))
    spec["optim"]["lr"] = "1e-3"
    assert load_run_spec(spec).optim.lr == 1e-3


@pytest.mark.parametrize("args", [["--lr", "inf"], ["--lr", "nan"], ["--distill", "inf"], ["--compression", "inf"]])
def test_non_finite_numbers_on_the_command_line_are_refused(tmp_path, base_model, args):
    base = ["compress", "--base", base_model, "--method", "hpr", "--compression", "0.5", "--steps", "0",
            "--out", tmp_path / "out", "--seq-len", "32"]
    if args[0] == "--compression":
        base[base.index("--compression") + 1] = args[1]
        args = []
    rc, out, err = cli(*base, *args)
    assert rc == 2, err
    refused(rc, err, "finite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--mem", "--gpu-mem"])
def test_non_finite_resources_flags_are_refused(tmp_path, flag):
    rc, out, err = cli("run", write_grid(tmp_path), "--dry-run", flag, "inf")
    assert rc == 2 and "Traceback" not in err and flag in err, err


DRY_RUN_IMPORTS = """
import sys
from pcbench.cli import main
rc = main(sys.argv[1:])
print("heavy:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
sys.exit(rc)
"""


def test_a_dry_run_of_known_shapes_imports_neither_torch_nor_transformers(tmp_path):
    """The dry run's checks and memory plans come from facts kept on disk (`util.memo`): once a
    grid's models are known, planning it needs neither torch nor transformers (seconds, not tens)."""
    def edit(g):
        g["stages"]["compress"]["axes"]["compression"] = [0.3, 0.5]
        g["stages"]["compress"]["spec"]["compress"]["compression"] = "${compression}"
    path = write_grid(tmp_path, edit)
    env = {"PCBENCH_CACHE": str(tmp_path / "cache")}
    args = [str(path), "--dry-run", "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w")]
    first = subprocess.run([sys.executable, "-c", DRY_RUN_IMPORTS, "run", *args], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=600)
    again = subprocess.run([sys.executable, "-c", DRY_RUN_IMPORTS, "run", *args], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=600)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "heavy: ['torch', 'transformers']" in first.stdout  # the first one computes them
    assert "heavy: []" in again.stdout, again.stdout
    assert first.stdout.replace("heavy: ['torch', 'transformers']", "") == again.stdout.replace("heavy: []", "")
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


COMPRESS = ["compress", "--method", "pc", "--steps", "1", "--out", "{tmp}/o", "--base"]


@pytest.mark.parametrize("args, needle", [
    (["train", "{tmp}/missing.yaml", "--out", "{tmp}/o"], "missing.yaml: file not found"),
    (["train", "{tmp}/broken.yaml", "--out", "{tmp}/o"], "broken.yaml:2: invalid YAML"),
    ([*COMPRESS, "{tmp}/nope", "--compression", "0.5"], "--base: "),
    ([*COMPRESS, "{tmp}", "--compression", "0.5"], "holds no model"),
    ([*COMPRESS, "smollm2-135m", "--compression", "1.5"], "--compression: "),
    (["eval", "{tmp}/nope"], "model: "),
    (["eval", "{tmp}/broken.yaml"], "is a file, not a checkpoint directory"),
])
def test_bad_input_is_refused_before_torch_is_imported(tmp_path, args, needle):
    """A command given bad input says so in one line, rc 2, in a fraction of a second: its checks
    run before the imports of torch and transformers (seconds each), and create nothing."""
    (tmp_path / "broken.yaml").write_text("x: [\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "-c", DRY_RUN_IMPORTS, *argv], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert "heavy: []" in r.stdout, r.stdout
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.pcbench").exists()


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("var,value,needle", [("PCBENCH_PARALLEL", "lots", "integer or auto"),
                                              ("PCBENCH_PARALLEL", "0", "at least 1"),
                                              ("PCBENCH_LOCAL_MODE", "thread", "unknown mode")])
def test_bad_local_executor_variables_are_refused_before_any_work(tmp_path, monkeypatch, var, value, needle, dry):
    """A bad PCBENCH_PARALLEL or PCBENCH_LOCAL_MODE was read only inside the executor: `run` wrote the
    store and prepared the data first, and `--dry-run` said the checks were ok."""
    monkeypatch.setenv(var, value)
    results = tmp_path / "results"
    rc, out, err = cli("run", write_grid(tmp_path), *(["--dry-run"] if dry else []), "--results", results,
                       "--work", tmp_path / "work")
    assert rc == 2, err
    one_error_line(err, var, needle)
    assert "checks before the first job: ok" not in out
    assert not results.exists() and not (tmp_path / "work").exists()


def test_a_parallel_flag_overrides_a_bad_variable(tmp_path, monkeypatch):
    """`--parallel N` is what the run uses: PCBENCH_PARALLEL is then not read, nor refused."""
    monkeypatch.setenv("PCBENCH_PARALLEL", "lots")
    rc, out, err = cli("run", write_grid(tmp_path), "--dry-run", "--parallel", "1", "--results", tmp_path / "r")
    assert rc == 0, err
    assert "checks before the first job: ok" in out


@pytest.mark.parametrize("cmd", ["dry-run", "run", "train", "compress"])
def test_a_cache_that_is_a_file_is_refused_before_any_output(tmp_path, monkeypatch, base_model, cmd):
    """PCBENCH_CACHE naming a file: `run --dry-run --work W` said ok (its facts cache silently skipped),
    `train --out` refused with the right line but left --out behind, `run` wrote results/<grid> first."""
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    monkeypatch.setenv("PCBENCH_CACHE", str(afile))
    out = tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(BASE_SPEC))
    args = {"dry-run": ["run", write_grid(tmp_path), "--dry-run", "--results", out, "--work", tmp_path / "w"],
            "run": ["run", write_grid(tmp_path), "--results", out, "--work", tmp_path / "w"],
            "train": ["train", spec, "--out", out],
            "compress": ["compress", "--base", base_model, "--method", "hpr", "--compression", "0.5", "--steps", "0",
                         "--out", out]}[cmd]
    rc, stdout, err = cli(*args)
    assert rc == 2, err
    one_error_line(err, "PCBENCH_CACHE", str(afile), "is a file")
    assert "checks before the first job: ok" not in stdout
    assert not out.exists() and not (tmp_path / "out.pcbench").exists() and not (tmp_path / "w").exists()
    assert afile.read_text() == "mine\n"


@pytest.mark.parametrize("cmd", ["dry-run", "train", "compress"])
@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_track_timeout_is_refused_at_the_start(tmp_path, monkeypatch, base_model, cmd, value):
    """PCBENCH_TRACK_TIMEOUT was read (float(), unchecked) only when a run's trackers closed: a run
    that had trained then failed as 'unexpected ValueError ... (a bug)', rc 1."""
    monkeypatch.setenv("PCBENCH_TRACK_TIMEOUT", value)
    out = tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(BASE_SPEC))
    args = {"dry-run": ["run", write_grid(tmp_path), "--dry-run", "--results", out],
            "train": ["train", spec, "--out", out],
            "compress": ["compress", "--base", base_model, "--method", "hpr", "--compression", "0.5", "--steps", "0",
                         "--out", out]}[cmd]
    rc, stdout, err = cli(*args)
    assert rc == 2, err
    one_error_line(err, "PCBENCH_TRACK_TIMEOUT", repr(value))
    assert not out.exists() and not (tmp_path / "out.pcbench").exists()


def test_a_bad_track_timeout_never_fails_a_run_that_trained(monkeypatch, capsys):
    """Where it is met anyway (a job started with it set), the trackers get the default wait and one
    warning line; closing does not raise."""
    import queue
    import threading

    from pcbench import tracking

    monkeypatch.setenv("PCBENCH_TRACK_TIMEOUT", "soon")
    s = tracking.Session.__new__(tracking.Session)
    s.names, s.done, s.queue = ["tensorboard"], False, queue.Queue()
    s.writer = threading.Thread(target=lambda: None)
    s.writer.start()
    s.proc = subprocess.Popen([sys.executable, "-c", "pass"])
    s.close("finished")
    assert s.done and s.proc.returncode == 0
    assert "PCBENCH_TRACK_TIMEOUT: must be a number of seconds" in capsys.readouterr().err
