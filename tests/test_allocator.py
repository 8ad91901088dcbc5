"""The training processes' malloc settings (pcbench/allocator.py): fewer page faults, the user's
own settings respected."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys
    from pcbench.util import allocator
    tuned = allocator.tune() if sys.argv[1] == "tune" else False
    import torch
    torch.set_num_threads(1)
    x = torch.randn(2048, 256)
    w = (torch.randn(256, 256) * 0.05).requires_grad_()
    for step in range(60):  # a training loop's pattern: activations allocated and freed every step
        if step == 10:  # after a warm-up: the faults of the steady state
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        h = x
        for _ in range(8):
            h = torch.tanh(h @ w)
        h.sum().backward()
        w.grad = None
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _probe(mode: str, **env) -> tuple[str, int]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PCBENCH_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**full, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
@glibc
def test_tuned_allocator_faults_far_fewer_pages():
    _, plain = _probe("plain")
    tuned, faults = _probe("tune")
    assert tuned == "True"
    assert faults < 0.25 * plain, (faults, plain)  # measured: <= 3k vs >= 26k


@glibc
@pytest.mark.parametrize("env", [{"PCBENCH_MALLOC": "system"},
                                 pytest.param({"MALLOC_TRIM_THRESHOLD_": "131072"}, marks=pytest.mark.slow),
                                 pytest.param({"MALLOC_ARENA_MAX": "2"}, marks=pytest.mark.slow)])
def test_users_malloc_settings_are_left_alone(env):
    assert _probe("tune", **env)[0] == "False"


# Whether glibc serves a 1 MiB block by mmap (its default threshold is 128 KiB; these settings' is
# 32 MiB): the IS_MMAPPED bit of the chunk's size field, read in the process itself.
MMAPPED = textwrap.dedent("""
    import ctypes, json, os, sys, threading
    from pcbench.util import allocator
    if sys.argv[1] == "thread":  # a thread that allocates while tune() runs
        stop = threading.Event()
        t = threading.Thread(target=lambda: [bytearray(4096) for _ in iter(stop.is_set, True)], daemon=True)
        t.start()
    tuned = allocator.tune() if sys.argv[1] != "none" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    p = libc.malloc(1 << 20)
    mmapped = bool(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2)
    libc.free(p)
    print(json.dumps({"tuned": tuned, "mmapped": mmapped, "threads": allocator.threads()}))
""")


def _mmapped(mode: str, **env) -> dict:
    import json

    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PCBENCH_MALLOC"}
    out = subprocess.run([sys.executable, "-c", MMAPPED, mode], env={**full, **env}, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc
def test_settings_in_effect_single_threaded_from_the_environment_and_never_under_threads():
    from pcbench.util import allocator

    assert _mmapped("none") == {"tuned": False, "mmapped": True, "threads": 1}  # glibc's default
    assert _mmapped("tune") == {"tuned": True, "mmapped": False, "threads": 1}  # mallopt, one thread
    # A process pcbench starts: the settings from its exec (glibc reads them before any thread).
    assert allocator.env({}) == allocator.ENV
    started = _mmapped("thread", **allocator.env({}))
    assert started["tuned"] is True and started["mmapped"] is False and started["threads"] == 2
    # Threads running and nothing in the environment: mallopt is not called, the defaults stand.
    assert _mmapped("thread") == {"tuned": False, "mmapped": True, "threads": 2}


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
@glibc
def test_processes_started_from_the_environment_fault_as_few_pages():
    from pcbench.util import allocator

    _, plain = _probe("plain")
    _, faults = _probe("plain", **allocator.env({}))  # no mallopt: only what glibc read at exec
    assert faults < 0.25 * plain, (faults, plain)


def test_users_choice_gives_children_nothing():
    from pcbench.util import allocator

    for env in ({"PCBENCH_MALLOC": "system"}, {"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
                {**allocator.ENV, "MALLOC_ARENA_MAX": "2"}):
        assert allocator.env(env) == {}, env


def _without_malloc_settings(monkeypatch) -> None:
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k == "PCBENCH_MALLOC"]:
        monkeypatch.delenv(k)


@glibc
def test_the_fork_server_gets_the_settings_from_its_exec(monkeypatch):
    """The local runs' fork server: glibc reads them at its exec (its tune() then calls no mallopt)."""
    from pathlib import Path

    from pcbench.run.executors import local
    from pcbench.util import allocator

    _without_malloc_settings(monkeypatch)
    server = local._ForkServer()
    server.warm()
    try:
        raw = Path(f"/proc/{server.proc.pid}/environ").read_bytes().decode().split("\0")
        environ = dict(kv.split("=", 1) for kv in raw if "=" in kv)
        assert {k: environ.get(k) for k in allocator.ENV} == allocator.ENV
    finally:
        server.close()


@glibc
def test_slurm_jobs_get_the_settings_in_their_batch_script(tmp_path, monkeypatch):
    from pcbench.grid.schema import Resources
    from pcbench.run.executors.slurm import SlurmExecutor
    from pcbench.util import allocator

    def exports() -> list[str]:
        ex, _ = SlurmExecutor().make(tmp_path, Resources(timeout_min=5))
        text = ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
        lines = text.splitlines()
        srun = next(i for i, ln in enumerate(lines) if ln.startswith("srun"))
        assert not any("MALLOC" in ln for ln in lines[srun:])
        return [ln for ln in lines[:srun] if "MALLOC" in ln]

    _without_malloc_settings(monkeypatch)
    assert exports() == [f"export {k}={v}" for k, v in allocator.ENV.items()]
    monkeypatch.setenv("PCBENCH_MALLOC", "system")
    assert exports() == []
