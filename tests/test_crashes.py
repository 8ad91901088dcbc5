"""A native crash of a process pcbench starts names where it happened (pcbench/util/crashes.py)."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A glibc heap error in the main thread while another thread waits: what issue 23's crash looked like.
DOUBLE_FREE = textwrap.dedent("""
    import ctypes, threading
    from pcbench.util import crashes
    assert crashes.enable()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    done = threading.Event()
    threading.Thread(target=done.wait, name="waiter", daemon=True).start()

    def a_step_that_frees_twice():
        p = libc.malloc(48)
        libc.free(p)
        libc.free(p)

    a_step_that_frees_twice()
    print("survived")
""")

ENABLED_BY = {
    "cli": "import pcbench.cli as c; c.main(['train', '/nonexistent/spec.yaml', '--out', '/nonexistent/out'])",
    "job": "from pcbench.run.jobs import RunJob; j = RunJob.__new__(RunJob); j._call = dict; j()",
}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONFAULTHANDLER", "PYTHONDEVMODE")}
    return {**env, "PYTHONPATH": str(ROOT)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap checks")
def test_a_heap_error_leaves_every_threads_python_stack():
    r = subprocess.run([sys.executable, "-c", DOUBLE_FREE], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGABRT, (r.returncode, r.stderr[-2000:])
    assert "survived" not in r.stdout
    assert "double free" in r.stderr  # glibc's own line
    assert "Fatal Python error: Aborted" in r.stderr
    assert "in a_step_that_frees_twice" in r.stderr  # where, in the crashing thread
    assert "Current thread 0x" in r.stderr  # the crashing thread
    assert "\nThread 0x" in r.stderr and "in wait" in r.stderr  # and every other thread (the waiter)


@pytest.mark.parametrize("entry", sorted(ENABLED_BY))
def test_processes_pcbench_runs_have_the_stacks_on(entry):
    code = ENABLED_BY[entry] + "\nimport faulthandler; print('enabled', faulthandler.is_enabled())"
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert "enabled True" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_a_stream_the_user_chose_is_kept(tmp_path):
    code = textwrap.dedent(f"""
        import faulthandler
        f = open({str(tmp_path / 'faults.log')!r}, 'w')
        faulthandler.enable(file=f)
        from pcbench.util import crashes
        assert crashes.enable()
        import ctypes; ctypes.string_at(0)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in (tmp_path / "faults.log").read_text()
    assert "Fatal Python error" not in r.stderr


def test_repeat_fsdp_keeps_a_users_files(tmp_path):
    """The repetition script (the tool to rerun a crash with) writes runNNN files only into a new,
    empty or its own folder: a folder holding other files is refused before any work."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "run000.log").write_text("the user's")
    for out in (user, user / "run000.log"):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "repeat-fsdp.py"), "--n", "0", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0 and str(out) in r.stderr
    assert (user / "run000.log").read_text() == "the user's" and sorted(p.name for p in user.iterdir()) == ["run000.log"]


@pytest.mark.parametrize("end,closed", [("returns", True), ("agreed stop", True),
                                        ("signal mid-step", False), ("error", False)])
def test_the_process_group_is_closed_at_an_agreed_end_only(end, closed):
    """Completed, or stopped by a signal after the step every rank agreed on: the group is closed
    (its gloo threads joined) before the process exits. A signal outside that point or an error
    leaves it: a peer may be inside a collective, and closing would wait for it."""
    import torch.distributed as dist

    from pcbench.train import interrupts

    raised = {"returns": None, "agreed stop": interrupts.Interrupted(signal.SIGTERM, step=3),
              "signal mid-step": interrupts.Interrupted(signal.SIGTERM), "error": OSError("disk full")}[end]
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        with contextlib.suppress(type(raised) if raised else ()):
            with interrupts.group_closed_at_an_agreed_end():
                dist.barrier()
                if raised is not None:
                    raise raised
        assert dist.is_initialized() is not closed
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# memcheck's report of a small C program that frees a block twice and writes into a freed one, and
# of ld.so's known over-read while Python loads torch (valgrind 3.19).
MEMCHECK = """\
==15105== Invalid read of size 8
==15105==    at 0x4023C6C: strncmp (strcmp-sse2.S:160)
==15105==    by 0x4004BEE: is_dst (dl-load.c:216)
==15105==    by 0x40081AB: _dl_map_object (dl-load.c:2111)
==15105== 
==15105== Invalid free() / delete / delete[] / realloc()
==15105==    at 0x484417B: free (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==15105==    by 0x109184: main (df.c:3)
==15105==  Address 0x4a40040 is 0 bytes inside a block of size 48 free'd
==15105==    at 0x484417B: free (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==15105==    by 0x10916A: main (df.c:3)
==15105== 
[rank 1] exit status 0
==15105== Invalid write of size 1
==15105==    at 0x1091A7: main (df.c:3)
==15105==  Address 0x4a40123 is 3 bytes inside a block of size 64 free'd
==15105==    at 0x484417B: free (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==15105== 
"""


def test_repeat_fsdp_counts_memchecks_heap_misuse_only():
    """`repeat-fsdp --check valgrind`: a double free and a write into a freed block are crashes;
    ld.so's over-read of a string (memcheck reports it in every Python that loads torch) is not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("repeat_fsdp", ROOT / "scripts" / "repeat-fsdp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    found = mod.valgrind_errors(MEMCHECK)
    assert [e.splitlines()[0] for e in found] == ["Invalid free() / delete / delete[] / realloc()",
                                                  "Invalid write of size 1"]
    assert "block of size 48 free'd" in found[0] and "df.c:3" in found[1]
    assert mod.valgrind_errors(MEMCHECK.split("==15105== \n")[0]) == []
