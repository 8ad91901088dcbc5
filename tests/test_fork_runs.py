"""The local executor's fork server and parallel runs (`pcbench/forkserver.py`, `pcbench/executors/local.py`).

Runs forked from the pre-imported server record exactly what fresh `python -m pcbench.run.jobs`
processes record; a child that dies hard (os._exit, a segfault, SIGKILL) is recorded failed or
interrupted and the launcher goes on; parallel runs start only once their dependencies completed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcbench.run import launch
from pcbench.run.executors import local
from pcbench.grid import load_grid
from test_launch import tiny_grid

ROOT = Path(__file__).resolve().parents[1]
FINAL_KEYS = ("train_loss_last100", "final_train_loss", "heldout_loss", "steps", "tokens")

# Loaded by the fork server (PYTHONPATH): the job of the run whose `seed` label is named in
# PCBENCH_TEST_CRASH ("seed:how,...") marks itself running, then dies as told.
CRASH_HOOK = '''
import os
if os.environ.get("PCBENCH_TEST_CRASH"):
    import pcbench.run.jobs as jobs
    run_locked = jobs.RunJob._run_locked

    def crashing(self, store, run, *args):
        how = dict(x.split(":") for x in os.environ["PCBENCH_TEST_CRASH"].split(",")).get(str(run["labels"].get("seed")))
        if how:
            store.set_status(self.run_id, "running", pid=os.getpid())
            if how == "exit":
                os._exit(7)
            if how == "segv":
                import ctypes
                ctypes.string_at(0)
            if how == "kill":
                os.kill(os.getpid(), 9)
        return run_locked(self, store, run, *args)

    jobs.RunJob._run_locked = crashing
'''


def seeds_grid(tmp: Path, seeds=(0, 1, 2, 3)) -> Path:
    """Independent tiny base runs, one per seed, each followed by its own compress (hpr) run."""
    g = yaml.safe_load(tiny_grid(tmp).read_text())
    g["stages"]["base"]["axes"] = {"seed": list(seeds)}
    g["stages"]["base"]["spec"]["train"].update(steps=10, seed="${seed}")
    g["stages"]["compress"]["axes"] = {"method": ["hpr"]}
    g["stages"]["compress"]["spec"]["train"]["steps"] = 5
    path = tmp / "seeds.yaml"
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    return path


def records(store) -> dict:
    out = {}
    for rid in store.run_ids():
        final = store.final(rid) or {}
        out[rid] = ({k: final.get(k) for k in FINAL_KEYS},
                    [(m["step"], m["loss"]) for m in store.metrics(rid) if "loss" in m])
    return out


@pytest.fixture
def fresh_server(monkeypatch):
    """A fork server of this test's own (started with this test's environment), closed after."""
    server = launch._ForkServer()
    monkeypatch.setattr(local, "_server", server)  # the local executor's
    yield server
    server.close()


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_forked_runs_record_what_fresh_processes_record(tmp_path, monkeypatch, fresh_server):
    path = tiny_grid(tmp_path)
    got = {}
    for mode in ("subprocess", "fork"):
        monkeypatch.setenv("PCBENCH_LOCAL_MODE", mode)
        grid = load_grid(path)
        store = launch.store_for(grid, tmp_path / mode, tmp_path / f"work-{mode}")
        out = launch.submit(grid, store, "local", progress=False, parallel=1)
        assert len(out.submitted) == 3 and not out.failed, out
        got[mode] = records(store)
        assert (fresh_server.proc is not None) == (mode == "fork")  # the server starts with the first fork
    assert got["fork"] == got["subprocess"]
    assert all(v[0]["train_loss_last100"] is not None for v in got["fork"].values())


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_hard_crashes_of_forked_jobs_leave_the_launcher_running(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    path = seeds_grid(tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "PCBENCH_TEST_CRASH": "1:exit,2:segv,3:kill", "PCBENCH_PARALLEL": "2"}
    env.pop("PCBENCH_LOCAL_MODE", None)
    p = subprocess.run([sys.executable, "-m", "pcbench.cli", "run", str(path), "--results", str(tmp_path / "r"),
                        "--work", str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "r", tmp_path / "w")
    state = {r.id: store.state(r.id) for r in grid.runs}
    base = {r.labels["seed"]: r.id for r in grid.runs if r.stage == "base"}
    assert store.state(base[0]) == "completed"
    assert store.state(base[1]) == "failed"  # os._exit(7): nothing recorded it but the launcher
    assert "exited with code 7" in store.status(base[1])["error"]
    assert store.state(base[2]) == "interrupted" and "SIGSEGV" in store.status(base[2])["error"]
    assert store.state(base[3]) == "interrupted" and "SIGKILL" in store.status(base[3])["error"]
    hpr = [r for r in grid.runs if r.stage == "compress"]
    done = [r for r in hpr if store.state(r.id) == "completed"]
    assert len(done) == 1 and done[0].deps == [base[0]], state  # the others were blocked, never started
    assert "1 failed, 3 blocked, 2 interrupted" in p.stdout, p.stdout


def test_parallel_runs_start_after_their_dependencies(tmp_path, monkeypatch, fresh_server):
    monkeypatch.delenv("PCBENCH_LOCAL_MODE", raising=False)
    path = seeds_grid(tmp_path, seeds=(0, 1))
    grid = load_grid(path)
    seq = launch.store_for(grid, tmp_path / "seq", tmp_path / "wseq")
    launch.submit(grid, seq, "local", progress=False, parallel=1)
    store = launch.store_for(grid, tmp_path / "par", tmp_path / "wpar")
    out = launch.submit(grid, store, "local", progress=False, parallel=2)
    assert len(out.submitted) == 4 and not out.failed and not out.blocked, out
    t = {(e["run"], e["state"]): e["time"] for e in _events(store) if e["state"] in ("running", "completed")}
    for run in grid.runs:
        for d in run.deps:
            assert t[(run.id, "running")] >= t[(d, "completed")], (run.id, d)
    bases = [r.id for r in grid.runs if r.stage == "base"]
    assert t[(bases[1], "running")] < t[(bases[0], "completed")]  # the two bases ran side by side
    assert records(store) == records(seq)  # the same threads per run: the same losses


def _events(store) -> list[dict]:
    from pcbench.util.atomic import read_jsonl

    return read_jsonl(store.events)


def test_local_mode_and_parallel_are_checked(monkeypatch, tmp_path):
    grid = load_grid(tiny_grid(tmp_path))
    monkeypatch.setenv("PCBENCH_LOCAL_MODE", "threads")
    with pytest.raises(Exception, match="PCBENCH_LOCAL_MODE"):
        launch.local_mode()
    monkeypatch.setenv("PCBENCH_LOCAL_MODE", "subprocess")
    assert launch.local_mode() == "subprocess"
    monkeypatch.delenv("PCBENCH_PARALLEL", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert launch.local_parallel(grid.runs) == cores  # the default is auto; tiny grid: 1 CPU thread per run
    assert launch.local_parallel(grid.runs, 1) == 1
    default = load_grid(ROOT / "experiments" / "default.yaml")
    assert launch.local_parallel(default.runs, "auto") == cores  # train and eval: threads 1 on the CPU
    mini = load_grid(ROOT / "experiments" / "mini.yaml")
    assert launch.local_parallel(mini.runs, "auto") == max(1, cores // 2)  # train.threads: 2
    tiny = yaml.safe_load(tiny_grid(tmp_path).read_text())
    for change in ({"device": "auto"}, {"device": "cuda"}, {"threads": None}):  # these take the machine
        d = {**tiny, "defaults": {**tiny["defaults"], "train": {**tiny["defaults"]["train"], **change}}}
        other = tmp_path / "other.yaml"
        other.write_text(yaml.safe_dump(d))
        assert launch.local_parallel(load_grid(other).runs, "auto") == 1, change
    monkeypatch.setenv("PCBENCH_PARALLEL", "3")
    assert launch.local_parallel(grid.runs) == 3
    with pytest.raises(Exception, match="parallel"):
        launch.local_parallel(grid.runs, 0)


@pytest.mark.slow  # two CLI launches of a 200-step pair (minutes on a shared 2-core machine)
def test_ctrl_c_stops_parallel_runs_then_a_rerun_finishes(tmp_path):
    import signal
    import time

    path = seeds_grid(tmp_path, seeds=(0, 1))
    g = yaml.safe_load(path.read_text())
    g["stages"]["base"]["spec"]["train"]["steps"] = 200
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "r", tmp_path / "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PCBENCH_LOCAL_MODE", None)
    cmd = [sys.executable, "-m", "pcbench.cli", "run", str(path), "--results", str(tmp_path / "r"),
           "--work", str(tmp_path / "w"), "--parallel", "2"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    bases = [r.id for r in grid.runs if r.stage == "base"]
    deadline = time.time() + 300
    while not all(store.metrics(b) for b in bases):  # both bases training at once
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert {store.state(b) for b in bases} == {"interrupted"}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(store.state(r.id) == "completed" for r in grid.runs)
    assert all(store.final(b)["resumed_from"] for b in bases)
