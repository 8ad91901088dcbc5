#!/usr/bin/env python
"""Issue 23's native crash ("double free or corruption (fasttop)", SIGABRT in rank 1 of the 2-process
FSDP `[pc-lean]` test): the hypotheses put to experiment, one JSON under results/bench/.

  PYTHONPATH=. python scripts/crash-study.py [--mallopt-seconds 45] [--exit-pairs 150] \\
      [--finalize-pairs 100] [--parts finalize,...] [--into JSON] \\
      [--repeat DIR ...]     # summary.json of scripts/repeat-fsdp.py runs to include

Parts:
  mallopt  scripts/mallopt-race.c: 4 threads malloc and free (16 B to 4 MiB, contents checked before
           each free) while the main thread calls mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) with
           alternating values, as pcbench's allocator did before c905f9b, under four glibc tunings
           (tcache on/off, one arena or many). A heap corruption ends it with a glibc abort or exit 3.
  threads  how many threads the training rank of the code before c905f9b had when it called mallopt
           (`pcbench.cli.main` builds its parser, then tunes): needs `--old DIR`, a checkout of it.
  exit     two gloo ranks train a small FSDP2 model (bf16 parameters) for 4 steps, then exit with
           and without `destroy_process_group` (c905f9b added it), alternating, `--exit-pairs` each.
  gloo     two gloo ranks run `--gloo-iterations` rounds of the collectives the test's FSDP step uses,
           in bf16 and fp32, random odd shapes, every result checked against the sum computed
           locally: all_gather_into_tensor and reduce_scatter_tensor (two in flight at once), a
           DTensor Shard(0) of uneven rows gathered, a Partial redistributed to Shard(0) (pcbench's
           MeshComm); plain, under glibc's debug malloc (a write past a block's end is caught when the
           block is freed) and under AddressSanitizer (every double free).
  finalize two gloo ranks run a few synchronous all-gathers whose tensors Python drops at once, then
           exit with and without `destroy_process_group`, alternating, `--finalize-pairs` each
           (`--finalize-late S`: rank 0 exits up to S s late, at random; `--finalize-env K=V`): a
           gloo worker thread that still holds a finished collective drops its tensors' Python objects
           during interpreter exit, which needs the GIL (pytorch/pytorch#190489). Also the native
           stack of one such abort, rank 1 under gdb (up to 12 tries).
  repeat   the repetitions of the test itself, from repeat-fsdp's summary.json files (with
           --sigterm-after: both ranks SIGTERM'd mid-run, the graceful stop's exit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TUNINGS = ["", "glibc.malloc.tcache_count=0", "glibc.malloc.arena_max=1",
           "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1"]

RANK = r'''
import os, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
torch.manual_seed(0)
model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)) for _ in range(4)])
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for block in model:
    fully_shard(block, mesh=mesh, mp_policy=mp)
fully_shard(model, mesh=mesh, mp_policy=mp)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(4):
    model(torch.randn(32, 256)).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
t = torch.ones(1000)
dist.all_reduce(t)
if sys.argv[1] == "destroy":
    dist.destroy_process_group()
'''


GLOO = r'''
import sys, time
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
iters = int(sys.argv[1])
bad = 0

def data(r, i, shape, dtype):
    g = torch.Generator().manual_seed(1000 * i + r)
    return (torch.randn(shape, generator=g) * 4).to(dtype)

t0 = time.time()
for i in range(iters):
    g = torch.Generator().manual_seed(i)
    dtype = [torch.bfloat16, torch.float32][i % 2]
    rows = int(torch.randint(1, 67, (1,), generator=g)); cols = int(torch.randint(1, 133, (1,), generator=g))
    # all_gather_into_tensor
    mine = data(rank, i, (rows, cols), dtype)
    out = torch.empty(world * rows, cols, dtype=dtype)
    works = [dist.all_gather_into_tensor(out, mine, async_op=True)]
    # reduce_scatter_tensor (sum) on [world*rows, cols]
    full = data(rank, i + 7, (world * rows, cols), dtype)
    rs = torch.empty(rows, cols, dtype=dtype)
    works.append(dist.reduce_scatter_tensor(rs, full, async_op=True))
    for w in works:
        w.wait()
    want = torch.cat([data(r, i, (rows, cols), dtype) for r in range(world)])
    bad += not torch.equal(out, want)
    want_rs = sum(data(r, i + 7, (world * rows, cols), dtype).float() for r in range(world)).to(dtype)[rank * rows:(rank + 1) * rows]
    bad += not torch.allclose(rs.float(), want_rs.float(), rtol=1e-2, atol=1e-2)
    # DTensor: uneven Shard(0) gathered, Partial -> Shard(0) redistributed (pcbench's MeshComm)
    n = rows * world + (i % world)
    whole = data(99, i, (n, cols), dtype)
    piece = torch.chunk(whole, world)[rank] if rank < len(torch.chunk(whole, world)) else whole[:0]
    shape = (n, cols)
    got = DTensor.from_local(piece, mesh, [Shard(0)], run_check=False, shape=shape, stride=whole.stride()).full_tensor()
    bad += not torch.equal(got, whole)
    part = data(rank, i + 13, (n, cols), dtype)
    red = DTensor.from_local(part, mesh, [Partial()]).redistribute(mesh, [Shard(0)]).to_local()
    tot = sum(data(r, i + 13, (n, cols), dtype).float() for r in range(world)).to(dtype)
    want_red = torch.chunk(tot, world)[rank]
    bad += not (red.shape == want_red.shape and torch.allclose(red.float(), want_red.float(), rtol=1e-2, atol=1e-2))
if sys.argv[2:] == ["destroy"]:
    dist.destroy_process_group()
print(f"rank {rank}: {iters} iterations, {bad} wrong results, {time.time() - t0:.1f}s", flush=True)
sys.exit(3 if bad else 0)
'''


def mallopt_part(seconds: float, work: Path) -> list[dict]:
    exe = work / "mallopt-race"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(ROOT / "scripts" / "mallopt-race.c")], check=True)
    out = []
    for tun in TUNINGS:
        r = subprocess.run([str(exe), "4", str(seconds)], env={**os.environ, "GLIBC_TUNABLES": tun},
                           capture_output=True, text=True)
        row = {"glibc_tunables": tun, "rc": r.returncode, "stderr": r.stderr.strip()[-300:]}
        if r.returncode == 0:
            row.update(json.loads(r.stdout))
        print("mallopt", json.dumps(row), flush=True)
        out.append(row)
    return out


def threads_part(old: Path) -> dict:
    # In the checkout: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    # (this part once ran where it was started, so it measured this tree's pcbench, not the checkout's).
    code = ("import os, sys\nimport pcbench.cli as c\nc.build_parser()\n"
            "print(len(os.listdir('/proc/self/task')), 'torch' in sys.modules, c.__file__)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(old), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, check=True, cwd=old)
    n, torch_loaded, where = r.stdout.split()
    if not where.startswith(f"{Path(old).resolve()}/"):
        raise SystemExit(f"crash-study: error: the threads part imported pcbench from {where}, not {old}")
    row = {"code": _commit(str(old)), "threads_at_mallopt": int(n),
           "torch_imported": torch_loaded == "True", "ran_code": True}
    print("threads", json.dumps(row), flush=True)
    return row


FINALIZE = r'''
import os, random, sys, time
import torch, torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
for _ in range(3):
    out, t = torch.empty(2 << 14), torch.ones(1 << 14)
    dist.all_gather_into_tensor(out, t)
    del out, t  # the Python objects go; a gloo thread may still hold the finished work
if sys.argv[1] == "destroy":
    dist.destroy_process_group()
late = float(os.environ.get("FINALIZE_LATE", "0"))
if late and rank == 0:  # its connections close while rank 1 is ending
    time.sleep(random.uniform(0, late))
'''

ABORTS = {"terminate": "terminate called without an active exception", "double_free": "double free",
          "heap": "corrupt", "segfault": "Segmentation fault"}


def _abort_kind(out: str) -> str:
    return next((k for k, v in ABORTS.items() if v in out), "other")


def torchrun_pair(script: Path, args: list[str], rank1: list[str] | None = None,
                  env: dict | None = None) -> tuple[int, str]:
    """`script` as two ranks under torchrun, as pcbench's ranks start (rank 1 wrapped in `rank1`,
    e.g. gdb): torchrun's exit status and everything printed."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    if rank1 is None:
        cmd = [*launch, str(script), *args]
    else:
        py = f'"{sys.executable}" "{script}" {" ".join(args)}'
        # rank 1's wrapper ignores torchrun's SIGTERM (sent when rank 0 fails) so that gdb finishes
        cmd = [*launch, "--no-python", "bash", "-c",
               f'if [ "$RANK" = 1 ]; then trap "" TERM; exec {" ".join(rank1)} {py}; else exec {py}; fi']
    r = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}, capture_output=True,
                       text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def finalize_part(pairs: int, work: Path, late: float = 0.0, env: dict | None = None) -> dict:
    rank = work / "finalize_rank.py"
    rank.write_text(FINALIZE)
    extra = {**(env or {}), **({"FINALIZE_LATE": str(late)} if late else {})}
    counts = {arm: {"ok": 0, "aborted": 0, "messages": {}} for arm in ("no_destroy", "destroy")}
    for i in range(pairs):
        for arm, c in counts.items():
            rc, out = torchrun_pair(rank, ["destroy" if arm == "destroy" else "exit"], env=extra)
            c["ok" if rc == 0 else "aborted"] += 1
            if rc != 0:
                kind = _abort_kind(out)
                c["messages"][kind] = c["messages"].get(kind, 0) + 1
        if (i + 1) % 10 == 0:
            print(f"finalize: {i + 1}/{pairs} pairs", json.dumps(counts), flush=True)
    if late or env:  # a variant: its counts only (the stack is the plain part's)
        return {"pairs": pairs, "launcher": "torchrun --standalone, 2 processes", "counts": counts,
                "rank0_exits_late_up_to_s": late, "env": env or {}}
    return {"pairs": pairs, "launcher": "torchrun --standalone, 2 processes", "counts": counts,
            "stack": finalize_stack(rank)}


def finalize_stack(rank: Path, tries: int = 12) -> dict:
    """The aborting thread's frames (function names), rank 1 under gdb, from the first try it aborts."""
    import re
    import shutil

    if not shutil.which("gdb"):
        return {"skipped": "gdb not installed"}
    gdb = ["gdb", "-q", "-batch", "-ex", "'set pagination off'", "-ex", "run", "-ex", "'bt 30'", "--args"]
    for attempt in range(1, tries + 1):
        _, out = torchrun_pair(rank, ["exit"], rank1=gdb)
        thread = re.search(r'Thread \d+ "([^"]+)" received signal SIGABRT', out)
        if not thread:
            continue
        bt = out[thread.end():]
        frames = [re.sub(r" \(.*", "", m.group(1))
                  for m in re.finditer(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\S.*)$", bt, re.M)]
        if not frames or frames[-1] != "clone3":  # cut short: try again
            continue
        return {"attempt": attempt, "thread": thread.group(1), "message": _abort_kind(out), "frames": frames}
    return {"attempts": tries, "aborted": False}


def two_ranks(script: Path, args: list[str], timeout: float, **env: str) -> tuple[list[int], list[str]]:
    """Run `script` as ranks 0 and 1 of a gloo group on this machine: their exit statuses and outputs."""
    import socket

    with socket.socket() as s:  # the store's port: rank 0 binds it at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
              "OMP_NUM_THREADS": "1", **env}
    procs = [subprocess.Popen([sys.executable, str(script), *args], env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def exit_part(pairs: int, work: Path) -> dict:
    rank = work / "rank.py"
    rank.write_text(RANK)
    counts = {arm: {"ok": 0, "bad": 0} for arm in ("no_destroy", "destroy")}
    bad = []
    for i in range(pairs):
        for arm in counts:
            rcs, outs = two_ranks(rank, ["destroy" if arm == "destroy" else "exit"], 300)
            ok = rcs == [0, 0]
            counts[arm]["ok" if ok else "bad"] += 1
            if not ok:
                bad.append({"arm": arm, "pair": i, "rcs": rcs, "tail": [o[-1500:] for o in outs]})
        if (i + 1) % 10 == 0:
            print(f"exit: {i + 1}/{pairs} pairs", json.dumps(counts), flush=True)
    return {"pairs": pairs, "counts": counts, "not_ok": bad}


def _commit(path: str) -> str:
    if not Path(path).is_dir():  # already a commit (a summary relabelled by hand)
        return path
    r = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or Path(path).name


def _repeat_summary(d: Path) -> dict:
    """A repeat-fsdp summary with the checkout as its commit and this machine's paths left out."""
    s = json.loads((d / "summary.json").read_text())
    imported = s.pop("ranks_imported", None)  # where the ranks' pcbench came from (repeat-fsdp since d87362e)
    if imported is not None:
        s["ranks_ran_code"] = bool(imported) and all(f.startswith(s["code"].rstrip("/") + "/") for f in imported)
    s["code"] = _commit(s["code"])
    env = [kv.split("=", 1) for kv in s.get("env", [])]
    preload = " ".join(v for k, v in env if k == "LD_PRELOAD")
    s["env"] = [f"{k}={':'.join(Path(p).name for p in v.split(':')) if k == 'LD_PRELOAD' else v.split(':log_path=')[0]}"
                for k, v in env]
    if s.get("check", "none") == "none" and preload:  # the checker given by --env instead of --check
        s["check"] = "asan" if "libasan" in preload else "glibc" if "malloc_debug" in preload else "none"
    return {"dir": d.name, **s}


def _checks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("repeat_fsdp", ROOT / "scripts" / "repeat-fsdp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.check_env


def gloo_part(iterations: int, checks: list[str], work: Path) -> list[dict]:
    rank = work / "gloo_rank.py"
    rank.write_text(GLOO)
    check_env, out = _checks(), []
    for check in checks:
        t0 = time.time()
        rcs, outs = two_ranks(rank, [str(iterations), "destroy"], 3600, PYTHONWARNINGS="ignore", **check_env(check))
        row = {"check": check, "iterations": iterations, "rcs": rcs,
               "lines": [o.strip().splitlines()[-1][-300:] if o.strip() else "" for o in outs],
               "seconds": round(time.time() - t0, 1)}
        print("gloo", json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mallopt-seconds", type=float, default=45)
    ap.add_argument("--exit-pairs", type=int, default=150)
    ap.add_argument("--gloo-iterations", type=int, default=10000)
    ap.add_argument("--finalize-pairs", type=int, default=100)
    ap.add_argument("--gloo-checks", default="none,glibc,asan")
    ap.add_argument("--finalize-late", type=float, default=0.0,
                    help="finalize: rank 0 exits up to this many seconds late, at random (a variant part)")
    ap.add_argument("--finalize-env", action="append", default=[], help="finalize: K=V for the ranks")
    ap.add_argument("--old", type=Path, help="a checkout of c905f9b~1 (the threads part)")
    ap.add_argument("--repeat", type=Path, nargs="*", default=[], help="repeat-fsdp output folders")
    ap.add_argument("--parts", default="mallopt,threads,gloo,exit,finalize,repeat")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    ap.add_argument("--into", type=Path, help="a study's JSON to add these parts to (rewritten in place)")
    a = ap.parse_args()
    from pcbench.bench.machine import finish, machine_info

    if a.into is not None:  # only a study's own JSON is rewritten, checked before any work
        try:
            ok = json.loads(a.into.read_text()).get("what", "").startswith("issue 23")
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            print(f"crash-study: error: --into {a.into}: not a JSON this script wrote", file=sys.stderr)
            return 2
    for d in a.repeat:
        if not (d / "summary.json").is_file():
            print(f"crash-study: error: --repeat {d}: no summary.json (an output folder of repeat-fsdp.py)",
                  file=sys.stderr)
            return 2
    parts = set(a.parts.split(","))
    info = machine_info()
    t0 = time.time()
    result: dict = {"what": "issue 23: hypotheses for the native crash, by experiment", "machine": info,
                    "glibc": os.confstr("CS_GNU_LIBC_VERSION")}
    with tempfile.TemporaryDirectory() as tmp:
        if "mallopt" in parts:
            result["mallopt_race"] = mallopt_part(a.mallopt_seconds, Path(tmp))
        if "threads" in parts and a.old:
            result["old_rank_threads"] = threads_part(a.old)
        if "gloo" in parts and a.gloo_iterations:
            result["gloo_collectives"] = gloo_part(a.gloo_iterations, a.gloo_checks.split(","), Path(tmp))
        if "exit" in parts and a.exit_pairs:
            result["exit_without_destroy"] = exit_part(a.exit_pairs, Path(tmp))
        if "finalize" in parts and a.finalize_pairs:
            env = dict(kv.split("=", 1) for kv in a.finalize_env)
            key = "exit_during_a_collective_release" + ("_late_peer" if a.finalize_late else "") + \
                ("_" + "_".join(f"{k}={v}" for k, v in sorted(env.items())) if env else "")
            result[key] = finalize_part(a.finalize_pairs, Path(tmp), a.finalize_late, env)
    if "repeat" in parts:
        result["repeat_fsdp"] = [_repeat_summary(d) for d in a.repeat]
    result["seconds"] = round(time.time() - t0, 1)
    finish(info)
    if a.into:  # the earlier parts kept, these added; each part's machine and time kept with it
        earlier = json.loads(a.into.read_text())
        added = {k: v for k, v in result.items() if k not in ("what", "glibc", "machine", "seconds")}
        earlier.setdefault("added", []).append({"parts": sorted(added), "machine": info, "seconds": result["seconds"]})
        if "repeat_fsdp" in added and earlier.get("repeat_fsdp"):  # more repetitions join the earlier ones
            new_dirs = {r["dir"] for r in added["repeat_fsdp"]}
            added["repeat_fsdp"] = [r for r in earlier["repeat_fsdp"] if r["dir"] not in new_dirs] + added["repeat_fsdp"]
        result, path = {**earlier, **added}, a.into
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / f"crash-study-{info['hostname']}-{stamp}.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_path, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
