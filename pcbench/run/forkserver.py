"""A pre-imported process that forks one child per local run: the imports are paid once.

The local executor (`pcbench/executors/local.py`) starts `python -m pcbench.run.forkserver CMD_FD REPLY_FD`
once, a fresh process that imports what every run imports (torch, transformers, lm-eval, the
training and evaluation code) and never runs a torch op or starts a Python thread: a fork of it is
a clean start (a fork after torch's thread pool has run would hang the child). Some imports start
native threads of their own (numpy's OpenBLAS pool unless OMP_NUM_THREADS=1, pyarrow's jemalloc
background thread); fork copies only the forking thread, and those libraries prepare for it and
start theirs again in the child (their fork handlers). The server reports its Python threads; with
more than one (something imported started one), the launcher does not fork from it. Each request (one JSON line
on CMD_FD: `args` of `pcbench.run.jobs.main`, the launcher's `env` and `cwd`) forks a child that runs
`pcbench.run.jobs.main(args)` exactly as `python -m pcbench.run.jobs` would and exits with its code; the
server answers `{"pid"}` and, once the child is reaped, `{"exit", "rc"}` (rc negative: killed by
that signal, as `subprocess` reports it). A child's crash (segfault, SIGKILL, os._exit) is only its
exit status: the server and the launcher go on. SIGINT/SIGTERM/SIGHUP/SIGQUIT are ignored here (the launcher
forwards them to the child, which handles them); the server exits when the launcher closes CMD_FD.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading

from pcbench.util import allocator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def preload() -> None:
    """Import what every run imports (imports only: no torch op, no Python thread)."""
    import pcbench.evaluate  # noqa: F401 - torch, transformers
    import pcbench.run.jobs  # noqa: F401 - submitit
    import pcbench.train.loop  # noqa: F401

    try:
        import datasets  # noqa: F401 - evaluation runs
        import lm_eval  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError:  # pragma: no cover - an install without lm-eval trains only
        pass


def _child(req: dict, fds: tuple[int, int]) -> None:
    """Run one job in this forked child and exit with its code; never returns."""
    code = 1
    try:
        for fd in fds:
            os.close(fd)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        from pcbench.run.jobs import main

        code = main(req["args"])
    except BaseException:  # noqa: BLE001 - a job records its own errors; this is a bug in the fork
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(cmd_fd: int, reply_fd: int) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)  # each child keeps them ignored until the job installs its own
    allocator.tune()  # before the imports allocate; every fork inherits it
    preload()
    threads = threading.active_count()

    def reply(msg: dict) -> None:
        os.write(reply_fd, (json.dumps(msg) + "\n").encode())

    reply({"ready": os.getpid(), "threads": threads})
    buf, children = b"", set()
    while True:
        ready, _, _ = select.select([cmd_fd], [], [], 0.05 if children else 1.0)
        if ready:
            chunk = os.read(cmd_fd, 1 << 16)
            if not chunk:  # the launcher is gone (or done): its children go on by themselves
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(req, (cmd_fd, reply_fd))
                children.add(pid)
                reply({"pid": pid})
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                reply({"exit": pid, "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    try:
        serve(int(sys.argv[1]), int(sys.argv[2]))
    except BrokenPipeError:  # the launcher left before a reply (e.g. nothing to run): children go on
        pass
