#!/usr/bin/env python
"""Repeat the 2-process FSDP run of tests/test_fsdp.py (`[pc-lean]` by default) many times and count
native crashes: the torchrun part only (the base model and the 1-process reference are made once),
so a repetition takes a fraction of the whole test.

  PYTHONPATH=. python scripts/repeat-fsdp.py --n 50 --out /tmp/fsdp-repeat --env PYTHONFAULTHANDLER=1
  ... --env GLIBC_TUNABLES=glibc.malloc.tcache_count=0   # every small free checked in a fastbin
                      # (glibc's "double free or corruption (fasttop)"); a malloc setting in the
                      # environment also means pcbench leaves glibc's parameters alone
  ... --stress 2      # two busy-looping processes beside the ranks (more preemption, other timings)
  ... --code DIR      # the pcbench to run (its PYTHONPATH), e.g. an older checkout
  ... --check asan    # every double or invalid free in the ranks reported (AddressSanitizer preloaded:
                      # freed blocks are quarantined, so a second free is caught even after glibc
                      # would have handed the block out again, which glibc's own checks miss)
  ... --check glibc   # glibc's debug malloc (MALLOC_CHECK_=3): also a write past a block's end,
                      # from any library, caught at the block's free
  ... --check valgrind  # each rank under valgrind's memcheck (a different, serialised thread
                      # schedule; PYTHONMALLOC=malloc): every free of a block not allocated or
                      # already freed, and every read or write into a freed block, counted as a crash
                      # (ld.so's known over-reads are not); about 100x slower (--timeout 3600)
  ... --inject double-free  # the positive controls, in each rank before it exits: a block freed
                      # twice, the kind glibc misses (--check asan must count every repetition a crash)
  ... --inject overrun      # a byte written past a tensor's end (--check glibc must)
  ... --inject late-peer    # not a control: rank 0 exits up to 0.5 s late, at random (its connections
                      # close while rank 1 tears down: the order of a run whose rank 0 writes the export)
  ... --sigterm-after 3     # SIGTERM both ranks once 3 steps are logged (scancel, a preemption), in
                      # a 400-step run: ok when each rank checkpoints the same step and exits 143

Each repetition is one of: ok (rc 0 and the losses of the 1-process run to rtol 1e-5, as the
test asserts; with --sigterm-after, both ranks stopped at one step with exit status 143), crash (a rank died of a signal or glibc printed a heap error), fail (anything else,
e.g. hung past --timeout: the stacks of the ranks left are logged); the logs of every repetition
that is not ok are kept (each rank's output, its exit status). One line per repetition, a summary
at the end (also as summary.json). Exit 1 when any repetition crashed or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HEAP = re.compile(r"double free|corruption|free\(\): invalid|malloc\(\)|munmap_chunk|malloc_consolidate|"
                  r"Fatal Python error|Segmentation fault|SIGABRT|SIGSEGV|SIGBUS|Signal 6|Signal 11|"
                  r"exitcode\s*:\s*-\d+|core dumped|exit status 1[2-9]\d|AddressSanitizer")

MARKER = ".repeat-fsdp"  # in each --out folder the script made

# What each --check preloads into the ranks (Debian/Ubuntu paths; gcc finds its libasan).
CHECKS = {"none": {}, "glibc": {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0",
                                "GLIBC_TUNABLES": "glibc.malloc.check=3"}}
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:alloc_dealloc_mismatch=0"
VALGRIND = ["valgrind", "--tool=memcheck", "--undef-value-errors=no", "--leak-check=no", "--fair-sched=yes",
            "--error-limit=no", "--num-callers=30"]


def valgrind_errors(text: str) -> list[str]:
    """memcheck's reports of a heap misuse in `text`: an invalid or double free, or a read or write
    inside a freed block (one string each; an error of ld.so's string functions is not one)."""
    errors, block = [], []
    for line in text.splitlines() + [""]:
        m = re.match(r"==\d+== ?(.*)", line)
        if m and m.group(1).strip():
            block.append(m.group(1))
            continue
        if block and (re.match(r"Invalid free|Mismatched free", block[0])
                      or (block[0].startswith("Invalid ") and any("free'd" in b for b in block))):
            errors.append("\n".join(block))
        block = []
    return errors

# The positive control (--inject): imported by every rank through PYTHONPATH.
INJECT = """
import atexit, ctypes, os
def _stale_double_free():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    a = libc.malloc(48); libc.free(a)
    b = libc.malloc(48)  # glibc hands a's block out again
    libc.free(a)         # a second free of a: b's block freed under it, no glibc message
def _overrun():
    import torch
    t = torch.empty(100, dtype=torch.uint8)
    ctypes.memset(t.data_ptr() + 100, 0x5A, 1)  # one byte past the tensor's end
    del t
def _late_peer():
    import random, time
    if os.environ.get("RANK") == "0":  # rank 0 closes its connections while rank 1 is ending
        time.sleep(random.uniform(0, float(os.environ.get("REPEAT_FSDP_LATE", "0.5"))))
if "LOCAL_RANK" in os.environ:  # the ranks, not torchrun's agent
    atexit.register({"overrun": _overrun, "late-peer": _late_peer}.get(os.environ.get("REPEAT_FSDP_INJECT"),
                                                                        _stale_double_free))
"""


def check_env(check: str) -> dict[str, str]:
    """The variables that put `check` into the ranks."""
    if check != "asan":
        return dict(CHECKS[check])
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    stdcpp = subprocess.run(["gcc", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    if not asan or not os.path.exists(asan):
        sys.exit("--check asan: gcc's libasan.so not found (apt-get install gcc)")
    # libstdc++ preloaded too: ASan's __cxa_throw interceptor needs it resolved at start (torch throws
    # through activation checkpointing's early stop)
    return {"LD_PRELOAD": f"{asan}:{stdcpp}", "ASAN_OPTIONS": ASAN_OPTIONS}


def spec(base: Path | None, method: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_fsdp import spec_dict  # the test's own spec

    if method == "pc-lean":
        d = spec_dict(base, "pc", optim={"clip": "compressed", "grad_clip": 0.05},
                      train={"activation_checkpointing": True})
        d["compress"].update(base_dtype="bfloat16", blockwise_step=True)
        return d
    return spec_dict(base, method) if base else spec_dict(train={"steps": 16})


def _commit(code: Path) -> str | None:
    r = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def busy() -> None:  # pragma: no cover - a stress process
    x = 0
    while True:
        x += 1


def prepare(out: Path, method: str) -> tuple[Path, list[float]]:
    """The base (16 steps, as the test's fixture) and the 1-process losses of the run, made once."""
    import yaml

    from pcbench.data.shards import is_prepared, prepare_store
    from pcbench.spec.config import load_run_spec
    from pcbench.spec.stores import run_stores
    from pcbench.train.loop import RunPaths, data_tokenizer_name, train
    from pcbench.util.atomic import read_jsonl

    def one(d: dict, where: Path) -> list[float]:
        if not (where / "record" / "final.json").exists():
            spec_ = load_run_spec(d)
            for s in run_stores(spec_, data_tokenizer_name(spec_)).values():  # a fresh cache has none
                if not is_prepared(s.ref, need=s.need):
                    prepare_store(s.ref, need=s.need, workers=2, log=lambda m: None)
            train(load_run_spec(d), RunPaths(record=where / "record", work=where / "work", export=where / "model"),
                  progress=False)
        return [r["loss"] for r in read_jsonl(where / "record" / "metrics.jsonl")]

    one(spec(None, "pretrain"), out / "base")
    d = spec(out / "base" / "model", method)
    ref = one(d, out / "one")
    d["train"]["parallel"] = "fsdp"
    spec_file = out / "two.yaml"
    spec_file.write_text(yaml.safe_dump(d))
    d["train"].update(steps=400, ckpt_every=1000, log_every=1)  # --sigterm-after: stopped long before the end
    (out / "stop.yaml").write_text(yaml.safe_dump(d))
    return spec_file, ref


def stop_ranks(run: Path, spec_file: Path, proc: subprocess.Popen, after: int, timeout: float) -> None:
    """SIGTERM both ranks (not torchrun) once `after` steps are in the run's metrics."""
    metrics, deadline = run / "record" / "metrics.jsonl", time.time() + timeout
    while proc.poll() is None and time.time() < deadline and \
            (not metrics.exists() or len(metrics.read_text().splitlines()) < after):
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-f", f"pcbench.cli train {spec_file} --out {run}$"],
                           capture_output=True, text=True).stdout.split()
    for pid in map(int, ranks):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)


def stopped_together(log: str) -> bool:
    """Both ranks exited 143 after printing that they stopped at one and the same step."""
    status = dict(re.findall(r"\[rank (\d)\] exit status (\d+)", log))
    steps = set(re.findall(r"interrupted by SIGTERM at step (\d+)", log))
    return status == {"0": "143", "1": "143"} and len(steps) == 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--method", default="pc-lean")
    ap.add_argument("--env", action="append", default=[], help="K=V for the torchrun processes")
    ap.add_argument("--unset", action="append", default=[], help="a variable removed from their environment")
    ap.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the pcbench checkout the ranks run (PYTHONPATH)")
    ap.add_argument("--stress", type=int, default=0, help="busy-looping processes beside the ranks")
    ap.add_argument("--check", choices=["none", "asan", "glibc", "valgrind"], default="none",
                    help="a heap checker in the ranks (module docstring)")
    ap.add_argument("--inject", choices=["double-free", "overrun", "late-peer"],
                    help="a positive control in each rank; late-peer: rank 0 ends up to REPEAT_FSDP_LATE "
                         "(0.5) s after its work, at random, so its connections close while rank 1 exits")
    ap.add_argument("--sigterm-after", type=int, metavar="STEPS",
                    help="SIGTERM both ranks once STEPS steps are logged (module docstring)")
    ap.add_argument("--timeout", type=float, default=400, help="seconds before a repetition counts as hung (its ranks' stacks are logged)")
    a = ap.parse_args()
    a.out, a.code = a.out.resolve(), a.code.resolve()
    mine = a.out / MARKER  # a folder this script made: its runNNN files may be replaced
    if a.out.exists() and (not a.out.is_dir() or (any(a.out.iterdir()) and not mine.exists())):
        print(f"repeat-fsdp: error: --out {a.out} is a file or a folder of other files: "
              "give a new or empty folder (or one repeat-fsdp made)", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    mine.touch()
    spec_file, ref = prepare(a.out / "prep", a.method)
    if a.sigterm_after:
        spec_file = spec_file.with_name("stop.yaml")
    env = {**os.environ, "PYTHONPATH": str(a.code.resolve()), "OMP_NUM_THREADS": "1",
           **(check_env(a.check) if a.check != "valgrind" else {"PYTHONMALLOC": "malloc"})}
    if a.inject:
        site = a.out / "inject"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(INJECT)
        env["REPEAT_FSDP_INJECT"] = a.inject
        env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    for k in a.unset:
        env.pop(k, None)
    env.update(kv.split("=", 1) for kv in a.env)
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(a.stress)]
    for h in hogs:
        h.start()
    counts = {"ok": 0, "crash": 0, "fail": 0}
    imported: set[str] = set()  # where the ranks' pcbench came from (must be --code's)
    secs = []
    try:
        for i in range(a.n):
            run = a.out / f"run{i:03d}"
            logs = a.out / f"run{i:03d}.ranks"
            subprocess.run(["rm", "-rf", str(run), str(logs)])  # an earlier invocation's, in this folder of ours
            # Each rank through a shell that logs its exit status (a rank that ends with 0 early
            # leaves torchrun waiting for the other), its output in files under `logs`.
            # With --sigterm-after the shell outlives torchrun's SIGTERM (sent once a rank exits 143), so
            # the other rank's own exit status is logged too.
            trap = 'trap ":" TERM; ' if a.sigterm_after else ""
            under = " ".join(VALGRIND + [f"--log-file={logs}/valgrind.%p.log"]) + " " if a.check == "valgrind" else ""
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                   "--log-dir", str(logs), "--redirects", "3", "--no-python", "bash", "-c",
                   f'{trap}"{sys.executable}" -c "import pcbench; print(\'[rank $RANK] pcbench from\', pcbench.__file__)" >&2; '
                   f'{under}"{sys.executable}" -u -m pcbench.cli "$@"; rc=$?; echo "[rank $RANK] exit status $rc" >&2; exit $rc',
                   "rank", "train", str(spec_file), "--out", str(run)]
            t0 = time.time()
            # In the checkout: `python -m` puts the working directory first on sys.path, before
            # PYTHONPATH, so ranks started elsewhere (e.g. in this tree) would import that pcbench.
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True, cwd=a.code)
            if a.sigterm_after:
                stop_ranks(run, spec_file, proc, a.sigterm_after, a.timeout)
            try:
                out, _ = proc.communicate(timeout=a.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
                stacks = subprocess.run(f"for p in $(pgrep -f 'pcbench.cli.*{run}'); do echo == $p; "
                                        f"timeout 120 gdb -p $p -batch -iex 'set auto-load safe-path /' "
                                        f"-ex 'thread apply all bt 30' -ex 'thread apply all py-bt' 2>&1; done",
                                        shell=True, capture_output=True, text=True).stdout
                os.killpg(proc.pid, 9)
                left = subprocess.run(["pgrep", "-f", f"pcbench.cli.*{run}"], capture_output=True, text=True).stdout
                for pid in map(int, left.split()):  # the ranks (in sessions of their own)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                out = proc.communicate()[0] + "\n== stacks of the ranks left ==\n" + stacks
            log = out + "".join(f"\n== {f} ==\n" + f.read_text(errors="replace")
                                for f in sorted(logs.rglob("*.log")) if f.is_file())
            secs.append(time.time() - t0)
            got = None
            metrics = run / "record" / "metrics.jsonl"
            if metrics.exists():
                got = [json.loads(ln)["loss"] for ln in metrics.read_text().splitlines() if ln.strip()]
            same = got is not None and len(got) == len(ref) and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(got, ref))
            # A rank torchrun SIGTERMs because its peer failed (-15 after "closing signal SIGTERM") is
            # not a crash of its own; with --sigterm-after, exit status 143 is the expected end.
            peer_closed = "closing signal SIGTERM" in log
            heap = HEAP.search(re.sub(r"exit status 143|exitcode\s*:\s*(?:-15|143)", "", log)
                               if a.sigterm_after or peer_closed else log)
            if a.check == "valgrind" and not heap:
                misuse = valgrind_errors(log)
                heap = re.search(re.escape(misuse[0].splitlines()[0]), log) if misuse else None
            if a.sigterm_after:  # exit status 143 is the expected end here, any other signal a crash
                kind = "ok" if stopped_together(log) and not heap else "crash" if heap else "fail"
            else:
                kind = "ok" if rc == 0 and same and not heap else "crash" if heap else "fail"
            counts[kind] += 1
            imported.update(re.findall(r"pcbench from (\S+)", log))
            if any(not f.startswith(f"{a.code}/") for f in imported):
                print(f"repeat-fsdp: error: the ranks imported pcbench from {sorted(imported)}, not --code {a.code}",
                      file=sys.stderr)
                return 2
            (a.out / f"run{i:03d}.log").write_text(log) if kind != "ok" else None
            sig = heap.group(0) if heap else ""
            print(f"{i:3d} {kind:5s} rc={rc} {secs[-1]:.1f}s {sig}", flush=True)
            subprocess.run(["rm", "-rf", str(run)] + ([str(logs)] if kind == "ok" else []))
    finally:
        for h in hogs:
            h.kill()
    summary = {**counts, "n": a.n, "method": a.method, "check": a.check, "inject": a.inject,
               "sigterm_after": a.sigterm_after, "env": a.env,
               "unset": a.unset, "stress": a.stress, "code": str(a.code), "commit": _commit(a.code),
               "ranks_imported": sorted(imported),
               "median_s": sorted(secs)[len(secs) // 2] if secs else None}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return 0 if counts["ok"] == a.n else 1


if __name__ == "__main__":
    sys.exit(main())
