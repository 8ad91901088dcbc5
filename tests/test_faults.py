"""Fault injection: a small grid (base -> hpr, pc on a nano model) interrupted by SIGINT, SIGTERM and
SIGKILL at several points, in the launcher and in its job; two launchers at once; damaged records;
state left in a shared work directory by another results dir.

After every fault a plain `pcbench run` finishes the grid, and its records equal an uninterrupted
run's: the same losses bit for bit, every metric step once and in order, nothing left running."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pcbench.train import checkpoint

from pcbench.run import launch
from pcbench.grid import load_grid
from pcbench.run.liveness import Liveness
from test_launch import tiny_grid

ROOT = Path(__file__).resolve().parents[1]
# one run at a time: each fault below is injected at a point of that order (side by side runs under
# a signal: tests/test_fork_runs.py)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PCBENCH_PARALLEL": "1"}
FINAL_KEYS = ("train_loss_last100", "final_train_loss", "heldout_loss", "steps", "tokens")
CURVE_KEYS = ("step", "loss", "loss_avg", "lr", "grad_norm", "tokens")


def fault_grid(tmp: Path, name: str = "faults") -> Path:
    """base (60 steps, a checkpoint every 5) -> compress (hpr, pc; 20 steps) on gpt2-nano."""
    path = tiny_grid(tmp, name=name, base_steps=60)
    g = yaml.safe_load(path.read_text())
    g["stages"]["compress"]["spec"]["train"]["steps"] = 20
    g["stages"]["compress"]["spec"]["compress"]["recovery_every"] = 5
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    return path


class Grid:
    """A grid file with its store (results under `tmp/results`, work under `tmp/work`)."""

    def __init__(self, tmp: Path, work: Path | None = None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.path = fault_grid(tmp)
        self.grid = load_grid(self.path)
        self.results, self.work = tmp / "results", work or tmp / "work"
        self.store = launch.store_for(self.grid, self.results, self.work)
        self.ids = {(r.labels.get("method") or r.stage): r.id for r in self.grid.runs}  # base, hpr, pc

    def args(self, *extra: str) -> list[str]:
        return [str(self.path), "--results", str(self.results), "--work", str(self.work), *extra]

    def start(self, *extra: str) -> subprocess.Popen:
        """`pcbench run` in its own session (as a terminal's foreground job would be)."""
        return subprocess.Popen([sys.executable, "-m", "pcbench.cli", "run", *self.args(*extra)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def cli(self, cmd: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pcbench.cli", cmd, *self.args(*extra)], env=ENV,
                              capture_output=True, text=True, timeout=600)

    def steps_logged(self, key: str) -> int:
        return max([r["step"] for r in self.store.metrics(self.ids[key])], default=0)

    def job_pid(self, key: str) -> int:
        return int(self.store.status(self.ids[key])["pid"])


def wait_until(pred, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run once without faults (in this process)."""
    g = Grid(tmp_path_factory.mktemp("reference"))
    out = launch.submit(g.grid, g.store, "local", progress=False)
    assert not out.failed and len(out.submitted) == 3
    return g


def assert_matches_reference(g: Grid, ref: Grid) -> None:
    """Every run completed with the reference's numbers, curves without a repeated step."""
    for key, rid in g.ids.items():
        assert g.store.state(rid) == "completed", (key, g.store.status(rid))
        mine, theirs = g.store.final(rid), ref.store.final(rid)
        assert {k: mine[k] for k in FINAL_KEYS} == {k: theirs[k] for k in FINAL_KEYS}, key
        curve = [{k: r.get(k) for k in CURVE_KEYS} for r in g.store.metrics(rid)]
        assert curve == [{k: r.get(k) for k in CURVE_KEYS} for r in ref.store.metrics(rid)], key
        steps = [r["step"] for r in g.store.metrics(rid)]
        assert steps == sorted(set(steps)), key  # no step twice, in order
        rec = [r["step"] for r in g.store.recovery(rid)]
        assert rec == [r["step"] for r in ref.store.recovery(rid)], key
        assert g.store.recovery(rid) == ref.store.recovery(rid), key
    live = Liveness(g.store)
    assert not [rid for rid in g.ids.values() if live.state(rid)[0] in ("running", "submitted")]


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_signals_in_launcher_and_job_then_plain_rerun_matches(reference, tmp_path):
    g = Grid(tmp_path)
    base, hpr, pc = g.ids["base"], g.ids["hpr"], g.ids["pc"]

    # 1. Ctrl-C (SIGINT to the whole foreground group) while the base trains.
    p = g.start()
    wait_until(lambda: checkpoint.list_checkpoints(g.store.paths(base).ckpt), "a base checkpoint")
    os.killpg(p.pid, signal.SIGINT)
    rc, out, err = finish(p)
    assert rc == 130, err[-3000:]
    no_traceback(err)
    assert len([ln for ln in err.splitlines() if "interrupted" in ln]) == 1, err
    assert f"run {base} recorded interrupted at step" in err and "run the same command again to resume" in err
    st = g.store.status(base)
    assert st["state"] == "interrupted" and 0 < st["step"] < 60
    # a checkpoint at the interruption point, kept
    assert int(checkpoint.list_checkpoints(g.store.paths(base).ckpt)[-1].name.split("_")[1]) == st["step"]
    assert g.store.state(hpr) == "pending"

    # 2. SIGTERM to the launcher alone (forwarded to its job) while hpr starts.
    p = g.start()
    wait_until(lambda: g.store.state(hpr) == "running", "hpr running")
    p.send_signal(signal.SIGTERM)
    rc, out, err = finish(p)
    assert rc == 143, err[-3000:]
    no_traceback(err)
    assert g.store.state(hpr) == "interrupted" and g.store.state(base) == "completed"
    assert g.store.final(base)["resumed_from"] == st["step"]

    # 3. SIGKILL of the pc job alone while it trains: the launcher records it, exits 1.
    p = g.start()
    wait_until(lambda: g.store.state(pc) == "running" and g.steps_logged("pc") >= 5, "pc training")
    os.kill(g.job_pid("pc"), signal.SIGKILL)
    rc, out, err = finish(p)
    no_traceback(err)
    assert rc == 1 and "1 interrupted" in out, out + err[-3000:]
    assert g.store.state(pc) == "interrupted" and "SIGKILL" in g.store.status(pc)["error"]

    # A plain rerun resumes everything that is left.
    rc, out, err = finish(g.start())
    assert rc == 0, err[-3000:]
    no_traceback(err)
    assert "run 1 of" in err  # progress off a TTY: which run of how many
    assert f"[pcbench] {pc}: step" in err  # and training progress lines
    assert_matches_reference(g, reference)
    attempts = {k: g.store.status(r)["attempts"] for k, r in g.ids.items()}
    assert attempts == {"base": 2, "hpr": 2, "pc": 2}


@pytest.mark.slow  # ~2x the default chain above; it adds SIGKILL of the whole group and signals at start-up
def test_kills_and_startup_signals_then_plain_rerun_matches(reference, tmp_path):
    g = Grid(tmp_path)
    base, hpr = g.ids["base"], g.ids["hpr"]

    # 1. SIGKILL of launcher and job (no chance to record anything) mid-base.
    p = g.start()
    wait_until(lambda: g.steps_logged("base") >= 10, "base at step 10")
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    assert g.store.state(base) == "running"  # what it last wrote ...
    wait_until(lambda: Liveness(g.store).state(base)[0] == "lost", "base seen lost", timeout=10)
    st = g.cli("status")
    assert st.returncode == 0 and "lost" in st.stdout and "running" not in st.stdout, st.stdout

    # 2. SIGTERM to the base job as soon as it is running (before or at its first steps).
    p = g.start()
    wait_until(lambda: g.store.state(base) == "running" and g.store.status(base)["attempts"] == 2, "base restarted")
    os.kill(g.job_pid("base"), signal.SIGTERM)
    rc, out, err = finish(p)
    assert rc == 143, err[-3000:]
    no_traceback(err)
    assert g.store.state(base) == "interrupted"

    # 3. Ctrl-C while the launcher is between runs / starting hpr.
    p = g.start()
    wait_until(lambda: g.store.state(base) == "completed", "base completed")
    os.killpg(p.pid, signal.SIGINT)
    rc, out, err = finish(p)
    assert rc == 130, err[-3000:]
    no_traceback(err)
    assert g.store.state(hpr) in ("pending", "interrupted")

    rc, out, err = finish(g.start())
    assert rc == 0, err[-3000:]
    no_traceback(err)
    assert_matches_reference(g, reference)
    assert g.store.status(base)["attempts"] == 3


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
@pytest.mark.parametrize("apart", [False, True], ids=["together", "apart"])
def test_two_launchers_train_each_run_once(reference, tmp_path, apart):
    g = Grid(tmp_path)
    first = g.start()
    if apart:  # the second starts while the first trains the base (its dependents must wait)
        wait_until(lambda: g.steps_logged("base") >= 5, "base training")
    second = g.start()
    (rc1, out1, err1), (rc2, out2, err2) = finish(first), finish(second)
    assert rc1 == 0 and rc2 == 0, err1[-2000:] + err2[-2000:]
    no_traceback(err1 + err2)
    assert {k: g.store.status(r)["attempts"] for k, r in g.ids.items()} == {"base": 1, "hpr": 1, "pc": 1}
    assert_matches_reference(g, reference)
    # each run was run by exactly one of them; the other one skipped it
    ran = [int(o.splitlines()[0].split()[0]) if o else 0 for o in (out1, out2)]
    assert sum(ran) == 3, (out1, out2)


def _hold_then_complete(root: str, work: str, rid: str, seconds: float) -> None:
    from pcbench.store import Store

    store = Store(root, work)
    with store.try_lock(rid):
        store.set_status(rid, "running", pid=os.getpid())
        time.sleep(seconds)
        store.set_status(rid, "completed")


def test_launcher_waits_for_work_another_process_holds(tmp_path, capfd):
    """A dependency trained by another live process is waited for (with a progress line), not failed."""
    import multiprocessing as mp

    from pcbench.store import Store

    store = Store(tmp_path / "res", tmp_path / "work")
    store.write_run({"id": "a", "stage": "s", "kind": "eval", "labels": {}, "spec": {}, "deps": [], "tune": None})
    holder = mp.get_context("fork").Process(target=_hold_then_complete,
                                            args=(str(store.root), str(store.work), "a", 3.0))
    holder.start()
    wait_until(lambda: store.lock_holder("a") and store.state("a") == "running", "the holder")
    assert Liveness(store).state("a")[0] == "running"
    assert not store.try_lock("a", wait_s=0.1)  # exactly one holder
    t0 = time.time()
    launch._wait_for(store, "a", "pid x", "b")
    assert time.time() - t0 > 1 and store.state("a") == "completed"
    assert "b: waiting for its dependency a" in capfd.readouterr().err
    holder.join()
    assert store.status("a")["attempts"] == 1
    lock = store.try_lock("a", wait_s=0)  # free again once its holder is gone
    assert lock is not None
    lock.release()


def _damage(g: Grid) -> dict[str, Path]:
    base, hpr, pc = (g.store.run_dir(g.ids[k]) for k in ("base", "hpr", "pc"))
    files = {"final": base / "final.json", "status": hpr / "status.json", "run": hpr / "run.json",
             "metrics": pc / "metrics.jsonl"}
    text = files["final"].read_text()
    files["final"].write_text(text[: len(text) // 2])  # truncated
    files["status"].write_text("")  # empty
    files["run"].write_text("{\"id\": ")  # truncated
    lines = files["metrics"].read_text().splitlines(keepends=True)
    files["metrics"].write_text("".join(lines[:1]) + lines[1][:7] + "\n" + "".join(lines[2:]))  # a torn line
    return files


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_damaged_records_are_reported_never_completed_and_rerun(reference, tmp_path):
    g = Grid(tmp_path)
    shutil.copytree(reference.results, g.results)  # the reference's records, damaged below
    files = _damage(g)

    st = g.cli("status")
    assert st.returncode == 0, st.stderr
    no_traceback(st.stderr)
    for key in ("final", "status"):
        assert str(files[key]) in st.stderr
    assert st.stdout.count("damaged") >= 2 and "completed" in st.stdout  # the rest of the table is there

    dry = g.cli("run", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    no_traceback(dry.stderr)
    assert str(files["final"]) in dry.stderr and "to submit: 3 runs" in dry.stdout, dry.stdout

    rep = subprocess.run([sys.executable, "-m", "pcbench.cli", "report", str(g.path), "--results", str(g.results),
                          "--out", str(tmp_path / "report")], env=ENV, capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    no_traceback(rep.stderr)
    for key in ("final", "run", "metrics"):
        assert str(files[key]) in rep.stderr, rep.stderr

    # A plain run reruns the three damaged runs (base, hpr; pc, whose metrics.jsonl is not the one
    # sealed when it completed) and repairs every record.
    rc, out, err = finish(g.start())
    assert rc == 0, err[-3000:]
    no_traceback(err)
    assert out.startswith("3 run(s) run, 0 skipped, 0 failed, 0 blocked"), out
    for key in ("base", "hpr", "pc"):
        rid = g.ids[key]
        assert g.store.health(rid)[0] == "completed"
        assert {k: g.store.final(rid)[k] for k in FINAL_KEYS} == {k: reference.store.final(rid)[k] for k in FINAL_KEYS}
    assert json.loads(files["run"].read_text())["id"] == g.ids["hpr"]  # rewritten from the grid


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_new_results_dir_never_resumes_another_ones_checkpoints(tmp_path):
    work = tmp_path / "shared-work"
    a = Grid(tmp_path / "a", work=work)
    g = yaml.safe_load(a.path.read_text())
    g["stages"] = {"base": g["stages"]["base"]}
    a.path.write_text(yaml.safe_dump(g))
    a.grid = load_grid(a.path)
    rc, _, err = finish(a.start())
    assert rc == 0, err[-2000:]
    base = a.ids["base"]
    assert checkpoint.list_checkpoints(a.store.paths(base).ckpt)  # left in the shared work dir
    b = Grid(tmp_path / "b", work=work)
    b.path.write_text(a.path.read_text())
    b.grid = load_grid(b.path)
    rc, _, err = finish(b.start())
    assert rc == 0, err[-2000:]
    fa, fb = a.store.final(base), b.store.final(base)
    assert fb["resumed_from"] == 0 and [r["step"] for r in b.store.metrics(base)][0] == 5  # from the start
    assert fa["export_path"] != fb["export_path"] and Path(fa["export_path"]).is_dir()  # a's export intact
    assert fa["train_loss_last100"] == fb["train_loss_last100"]


# ---------------------------------------------------------------------------------------------
# The launcher's word (issue 23): its fork server killed mid-grid, and SIGHUP (a closed terminal).

# Loaded by every process (PYTHONPATH): the job of the run named in PCBENCH_TEST_KILL_SERVER
# ("base", "hpr" or "pc", then ":go-on" or ":die") SIGKILLs its fork server as it starts, then trains
# on (go-on) or dies without recording the run (die). Only a forked job does it (its parent is the server).
KILL_SERVER_HOOK = '''
import os
if os.environ.get("PCBENCH_TEST_KILL_SERVER"):
    import pcbench.run.jobs as jobs
    run_locked = jobs.RunJob._run_locked

    def killing(self, store, run, *args):
        key, how = os.environ["PCBENCH_TEST_KILL_SERVER"].split(":")
        try:
            parent = open(f"/proc/{os.getppid()}/cmdline", "rb").read()
        except OSError:
            parent = b""
        if (run["labels"].get("method") or "base") == key and b"pcbench.run.forkserver" in parent:
            os.kill(os.getppid(), 9)
            if how == "die":
                store.set_status(self.run_id, "running", pid=os.getpid())
                os._exit(7)
        return run_locked(self, store, run, *args)

    jobs.RunJob._run_locked = killing
'''


@pytest.mark.parametrize("victim,how", [("base", "go-on"), pytest.param("hpr", "die", marks=pytest.mark.slow)])
def test_fork_server_killed_mid_grid_the_launcher_goes_by_the_records(reference, tmp_path, victim, how):
    """The jobs of a dead fork server are judged by what they recorded: one that completes counts as
    completed (its dependents run, exit 0); one that dies unrecorded is recorded interrupted and a
    plain rerun finishes the grid with the uninterrupted run's numbers."""
    g = Grid(tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_SERVER_HOOK)
    env = {**ENV, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "PCBENCH_TEST_KILL_SERVER": f"{victim}:{how}"}
    env.pop("PCBENCH_LOCAL_MODE", None)
    p = subprocess.run([sys.executable, "-m", "pcbench.cli", "run", *g.args()], env=env, capture_output=True,
                       text=True, timeout=600)
    no_traceback(p.stderr)
    assert "recorded as failed" not in p.stderr + p.stdout, p.stderr[-3000:]
    assert "the fork server ended" in p.stderr, p.stderr[-3000:]
    assert not [r for r in g.ids.values() if g.store.state(r) == "failed"]
    if how == "go-on":
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        assert "3 run(s) run, 0 skipped, 0 failed, 0 blocked" in p.stdout, p.stdout
        assert_matches_reference(g, reference)
        return
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert "1 interrupted" in p.stdout and g.store.state(g.ids[victim]) == "interrupted", p.stdout
    assert len([ln for ln in p.stderr.splitlines() if g.ids[victim] in ln and "without recording" in ln]) == 1
    rc, out, err = finish(g.start())
    assert rc == 0, err[-3000:]
    no_traceback(err)
    assert_matches_reference(g, reference)


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_sighup_stops_at_a_step_boundary_like_sigterm_then_plain_rerun_matches(reference, tmp_path, sig):
    """A closed terminal (SIGHUP to the foreground group) or Ctrl-\\ (SIGQUIT to it), then the same
    signal to one job alone: each time one line, exit 128+signal, the run recorded `interrupted` with a
    checkpoint at the step it stopped at; a plain rerun finishes with the uninterrupted run's numbers."""
    g = Grid(tmp_path)
    base, hpr = g.ids["base"], g.ids["hpr"]

    # 1. The terminal closes (SIGHUP to the whole group) while the base trains.
    p = g.start()
    wait_until(lambda: checkpoint.list_checkpoints(g.store.paths(base).ckpt), "a base checkpoint")
    os.killpg(p.pid, sig)
    rc, out, err = finish(p)
    assert rc == 128 + sig, err[-3000:]
    no_traceback(err)
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and sig.name in lines[0] and "run the same command again to resume" in lines[0], err
    st = g.store.status(base)
    assert st["state"] == "interrupted" and 0 < st["step"] < 60, st
    assert int(checkpoint.list_checkpoints(g.store.paths(base).ckpt)[-1].name.split("_")[1]) == st["step"]
    assert Liveness(g.store).state(base)[0] == "interrupted"

    # 2. The signal to the hpr job alone (e.g. its own terminal): the launcher reports it and stops.
    p = g.start()
    wait_until(lambda: g.store.state(hpr) == "running" and g.steps_logged("hpr") >= 5, "hpr training")
    os.kill(g.job_pid("hpr"), sig)
    rc, out, err = finish(p)
    assert rc == 128 + sig, err[-3000:]
    no_traceback(err)
    assert len([ln for ln in err.splitlines() if "interrupted" in ln]) == 1, err
    st = g.store.status(hpr)
    assert st["state"] == "interrupted" and st["step"] > 0, st
    assert int(checkpoint.list_checkpoints(g.store.paths(hpr).ckpt)[-1].name.split("_")[1]) == st["step"]

    rc, out, err = finish(g.start())
    assert rc == 0, err[-3000:]
    no_traceback(err)
    assert_matches_reference(g, reference)
