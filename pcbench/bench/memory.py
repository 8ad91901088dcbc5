"""`pcbench bench memory`: the memory plan (`pcbench.train.memory`) against measured peaks.

Each cell (method x processes x parallelism x model size, plus PC with block-wise stepping) runs
in fresh processes (`torch.distributed.run` for more than one): a seeded from-scratch base of the
cell's shape, a random-importance plan at the level, the method built and wrapped as the training
loop does (`parallel.wrap`, AdamW, `train.Stepper`), then `steps` optimiser steps on a fixed batch.
Measured per process: on CUDA `torch.cuda.max_memory_allocated` minus what was allocated before
the build; on CPU the peak RSS (VmHWM, reset with /proc/self/clear_refs after the build) minus
the RSS after imports and a warm-up step of a tiny model (so code pages and allocator pools do
not count), with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so that freed tensors
leave the RSS. The largest rank's figure is compared with the plan of the same spec; the JSON
(under results/bench/, with machine info) holds both, the breakdown and the relative error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from pcbench.bench import run_stem
from pcbench.bench.machine import REPO, finish, machine_info

SIZES = {  # name -> (preset, shape overrides); vocabulary and sequence from the flags
    "gpt2-17m": ("gpt2-tiny", {"layers": 4, "d_model": 512, "heads": 8, "head_dim": 64, "d_ff": 2048}),
    "llama-57m": ("llama-tiny", {"layers": 8, "d_model": 768, "heads": 12, "kv_heads": 4, "head_dim": 64,
                                 "d_ff": 2048}),
    # Llama-3.2-1B's shape (random init; vocabulary 128,256 from the flags or the cell, tied head)
    "llama3.2-1b": ("llama-tiny", {"layers": 16, "d_model": 2048, "heads": 32, "kv_heads": 8, "head_dim": 64,
                                   "d_ff": 8192}),
}
TIED = {"llama3.2-1b"}  # sizes whose head is the embedding
DEFAULT_CELLS = ("hpr:1:ddp,pc:1:ddp,hpr:2:ddp,pc:2:ddp,hpr:2:fsdp,pc:2:fsdp,pc-blockwise:1:ddp,"
                 "pc-blockwise:2:fsdp")
TOLERANCE = 0.15


def cell_spec(cfg: dict, config_dir: str) -> dict:
    """The run spec (as a mapping) a cell measures, for the planner and the build alike."""
    method = cfg["method"].split("-")[0]
    blockwise = cfg["method"].endswith("blockwise")
    return {
        "model": {"name": "hf", "path": config_dir},
        "data": {"tokenizer": f"bpe-{cfg['vocab']}", "seq_len": cfg["seq"]},
        "train": {"steps": cfg["steps"], "batch_size": cfg["rows"] * cfg["world"], "micro_batch_size": cfg["micro"],
                  "device": cfg["device"], "precision": "auto", "parallel": cfg["parallel"]},
        "optim": {"lr": 1e-3, "clip": "compressed" if blockwise else "global"},
        "compress": {"method": method, "compression": cfg["compression"], "importance": "random",
                     "blockwise_step": blockwise},
    }


def _warm_up(device) -> None:
    """One step of a tiny model, so that kernels, code pages and thread pools exist before the baseline."""
    import torch

    from pcbench import models
    from pcbench.spec.config import ModelSpec

    m = models.build_model(models.build_config(ModelSpec(name="llama-tiny"), 64, 16)).to(device)
    opt = torch.optim.AdamW(m.parameters())
    x = torch.randint(0, 64, (2, 17), device=device)
    out = m(input_ids=x[:, :-1]).logits
    torch.nn.functional.cross_entropy(out.flatten(0, 1).float(), x[:, 1:].flatten()).backward()
    opt.step()
    del m, opt, out


def probe(cfg: dict) -> dict:
    """One rank of one cell: build, step, measure (bytes)."""
    import torch

    from pcbench.train import distributed, interrupts, parallel

    from pcbench.spec import methods

    from pcbench import models
    from pcbench.compress import importance
    from pcbench.compress.plan import make_plan
    from pcbench.bench.step_cost import _settle_and_reset_peak, _status_bytes, memory_baseline
    from pcbench.spec.config import ModelSpec, load_run_spec
    from pcbench.train.loop import Stepper, amp_ctx

    torch.set_num_threads(cfg["threads"])
    spec = load_run_spec(cell_spec(cfg, cfg["config_dir"]))
    env = distributed.setup(cfg["device"], group=cfg["parallel"] == "fsdp")
    dev = env.device
    cuda = dev.type == "cuda"
    _warm_up(dev)
    real_ids = None
    if cfg.get("tokenizer"):  # real ids: text through the named tokenizer (e.g. the packaged llama3),
        from pcbench.data.tokenizer import load_tokenizer  # loaded and dropped before the baseline

        tok = load_tokenizer(cfg["tokenizer"])
        ids = tok(_TEXT)["input_ids"]
        n = cfg["rows"] * (cfg["seq"] + 1)
        real_ids = torch.tensor((ids * (n // len(ids) + 1))[:n]).view(cfg["rows"], -1)
        del tok
        gc.collect()
    start = memory_baseline(dev)
    preset, over = SIZES[cfg["size"]]
    base = models.build_model(_config(cfg), seed=0)
    base.config.use_cache = False
    plan = make_plan(base, cfg["compression"], importance.random(base, 0))
    c = spec.compress
    trainable = methods.build(c.method, base, plan, spec, dev)  # as the training loop builds it
    del base, plan
    trainable.model.train()
    par = parallel.wrap(trainable, env, spec)
    opt = torch.optim.AdamW(trainable.param_groups(0.1), lr=1e-3)
    stepper = Stepper(trainable, par.net, opt, None, micro=cfg["micro"], amp=amp_ctx(dev, "auto"), env=env,
                      par=par, grad_clip=1.0, clip=spec.optim.clip, blockwise=c.blockwise_step)
    g = torch.Generator().manual_seed(1 + env.rank)
    batch = torch.randint(0, cfg["vocab"], (cfg["rows"], cfg["seq"] + 1), generator=g).to(dev)
    if real_ids is not None:
        batch = real_ids.to(dev)
    if cuda:
        gc.collect()
        built = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        if not _settle_and_reset_peak():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): no CPU measurement")
        built = _status_bytes("VmRSS")
    for step in range(cfg["steps"]):
        stepper(batch, step)
    peak = torch.cuda.max_memory_allocated(dev) if cuda else _status_bytes("VmHWM")
    # persistent: after the build (AdamW's states come at the first step)
    out = {"rank": env.rank, "baseline": start, "persistent": built - start, "peak": peak - start}
    distributed.barrier(env)
    interrupts.close_process_group()
    return out


def measure(cfg: dict) -> list[dict]:
    """Run one cell in fresh process(es); every rank's measurement."""
    with tempfile.TemporaryDirectory(prefix="pcbench-mem-") as tmp:
        out = Path(tmp) / "rank"
        cfg = {**cfg, "out": str(out)}
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(cfg["threads"]))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        mod = [sys.executable, "-m", "pcbench.bench.memory"]
        if cfg["world"] > 1:
            mod = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg["world"]),
                   "--standalone", "-m", "pcbench.bench.memory"]  # the agent holds the rendezvous port
        res = subprocess.run(mod + ["--probe", json.dumps(cfg)], capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe failed ({res.returncode}): {res.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


_TEXT = ("The projections of a frozen weight are trained while the tokens run through the small network; "
         "hard pruning keeps the same rows and columns and retrains them.")


def _config(cfg: dict):
    from pcbench import models
    from pcbench.spec.config import ModelSpec

    preset, over = SIZES[cfg["size"]]
    config = models.build_config(ModelSpec(name=preset, **over), cfg["vocab"], cfg["seq"])
    config.tie_word_embeddings = cfg["size"] in TIED
    return config


def write_config(cfg: dict, where: Path) -> None:
    """The cell's base config.json (what the planner reads; no weights)."""
    _config(cfg).save_pretrained(where)


CELL_METHODS = ("hpr", "pc", "pc-blockwise")


def parse_cells(text: str) -> list[tuple[str, int, str]]:
    """`"hpr:1:ddp,pc:2:fsdp"` -> [(method, processes, parallel)]; a malformed cell is a SpecError."""
    from pcbench.spec.config import SpecError

    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        if (len(fields) != 3 or fields[0] not in CELL_METHODS or not fields[1].isdigit() or int(fields[1]) < 1
                or fields[2] not in ("ddp", "fsdp")):
            raise SpecError("--cells", f"bad cell {part!r}: want METHOD:PROCESSES:PARALLEL with METHOD "
                            f"{'|'.join(CELL_METHODS)}, PROCESSES >= 1, PARALLEL ddp|fsdp (e.g. pc:2:fsdp)")
        out.append((fields[0], int(fields[1]), fields[2]))
    if not out:
        raise SpecError("--cells", "no cell given")
    return out


def parse_sizes(text: str) -> list[str]:
    from pcbench.spec.config import SpecError

    sizes = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise SpecError("--sizes", f"unknown size(s) {', '.join(map(repr, bad)) or '(none)'}; known: {', '.join(SIZES)}")
    return sizes


def run(args) -> dict:
    from pcbench.train import memory
    from pcbench.spec.config import load_run_spec
    from pcbench.util.devices import resolve_device

    sizes, todo = parse_sizes(args.sizes), parse_cells(args.cells)  # bad input: one line, before any work
    device = str(resolve_device(args.device))
    info = machine_info()
    cells = []
    with tempfile.TemporaryDirectory(prefix="pcbench-memcfg-") as cfg_root:
        for size in sizes:
            for method, world, par in todo:
                cfg = {"method": method, "world": world, "parallel": par, "size": size, "vocab": args.vocab,
                       "seq": args.seq, "rows": args.rows, "micro": args.micro, "steps": args.steps,
                       "compression": args.compression, "threads": args.threads, "device": device}
                cdir = Path(cfg_root) / size
                if not cdir.exists():
                    write_config(cfg, cdir)
                cfg["config_dir"] = str(cdir)
                spec = load_run_spec(cell_spec(cfg, str(cdir)))
                p = memory.plan(spec, world, device=device)
                t = time.time()
                ranks = measure(cfg)
                measured = max(r["peak"] for r in ranks)
                err = (p.peak - measured) / measured
                cell = {"size": size, "method": method, "processes": world, "parallel": par,
                        "plan_peak_bytes": p.peak, "measured_peak_bytes": measured, "error": err,
                        "plan_built_bytes": p.persistent - p.components["optimizer"],
                        "measured_built_bytes": max(r["persistent"] for r in ranks),
                        "plan": p.to_dict(), "ranks": ranks, "seconds": round(time.time() - t, 1)}
                cells.append(cell)
                print(row(cell), flush=True)
    saved = []
    for c in cells:
        if c["method"] != "pc-blockwise":
            continue
        ref = next((r for r in cells if r["method"] == "pc" and r["size"] == c["size"]
                    and r["processes"] == c["processes"] and r["parallel"] == c["parallel"]), None)
        if ref:
            saved.append({"size": c["size"], "processes": c["processes"], "parallel": c["parallel"],
                          "measured_saved_bytes": ref["measured_peak_bytes"] - c["measured_peak_bytes"],
                          "plan_saved_bytes": ref["plan_peak_bytes"] - c["plan_peak_bytes"],
                          "measured_saved_fraction": 1 - c["measured_peak_bytes"] / ref["measured_peak_bytes"]})
    return {"benchmark": "memory", "device": device, "machine": finish(info),
            "method": MEASURE_METHOD[device if device == "cuda" else "cpu"],
            "config": {k: getattr(args, k) for k in ("sizes", "cells", "vocab", "seq", "rows", "micro", "steps",
                                                     "compression", "threads")},
            "sizes": {k: {"preset": v[0], **v[1]} for k, v in SIZES.items()},
            "tolerance": TOLERANCE, "cells": cells, "blockwise_saved": saved,
            "max_abs_error": max(abs(c["error"]) for c in cells) if cells else None,
            "all_within_tolerance": all(abs(c["error"]) <= TOLERANCE for c in cells)}


MEASURE_METHOD = {
    "cuda": "per rank: torch.cuda.max_memory_allocated over the steps minus memory_allocated before the build",
    "cpu": "per rank, fresh process: peak RSS (VmHWM, reset by /proc/self/clear_refs 5 after the build) minus "
           "RSS after imports and a warm-up step of a tiny model; MALLOC_MMAP_THRESHOLD_=65536 so freed "
           "tensors are returned to the OS; the largest rank counts",
}


def row(c: dict) -> str:
    mib = 2.0 ** 20
    return (f"{c['size']:>10} {c['method']:>13} x{c['processes']} {c['parallel']:>4}  "
            f"plan {c['plan_peak_bytes'] / mib:8.1f}"
            f" MiB  measured {c['measured_peak_bytes'] / mib:8.1f} MiB  error {100 * c['error']:+6.1f}%  "
            f"(built plan/measured {c['plan_built_bytes'] / mib:.0f}/{c['measured_built_bytes'] / mib:.0f})"
            f"  {c['plan']['peak_phase']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcbench bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument("--cells", default=DEFAULT_CELLS, help="METHOD:PROCESSES:PARALLEL, comma-separated")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rows", type=int, default=4, help="rows per process per step")
    p.add_argument("--micro", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps (DDP rebuilds its buckets after the first)")
    p.add_argument("--compression", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from pcbench.util.atomic import write_json

    args = parser().parse_args(argv)
    if args.probe:  # internal: one rank of one cell in this fresh process
        cfg = json.loads(args.probe)
        res = probe(cfg)
        Path(f"{cfg['out']}{res['rank']}.json").write_text(json.dumps(res))
        return 0
    rec = run(args)
    path = run_stem(Path(args.out), "memory", ".json")
    write_json(path, rec)
    print(f"max |error| {100 * rec['max_abs_error']:.1f}% (tolerance {100 * TOLERANCE:.0f}%); wrote {path}")
    return 0 if rec["all_within_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
