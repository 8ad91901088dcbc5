"""Optimiser-step cost of Projected Compression against hard pruning (HPR) as tokens per step grow.

Per cell (tokens per optimiser step, split into micro-batches) and method, in one process:
- `hpr`: `Direct(prune(base, plan))`;
- `pc`: cost-free `Projected` (materialise once per step, push gradients into P/R once);
- `naive`: method `pc-naive` (`pcbench.methods.pc_naive`), autograd through P.W.P inside every
  micro-batch forward.
Each optimiser step is the training loop's `Stepper`; warm-up steps are excluded, repeats are
interleaved across methods (order rotated), medians reported with 95% bootstrap intervals.

PC's fixed part is measured directly: the seconds of `before_step` (materialise) and
`after_backward` (push) inside every timed PC step (device-synchronised), and of the optimiser
step of every method (step hooks). PC/HPR is reported three ways: the whole-step ratio of
medians, 1 + fixed / HPR step (the fixed part measured, the rest assumed equal to HPR's), and the
FLOP prediction 1 + fixed FLOPs / token FLOPs. Peak memory per method: on CUDA
`max_memory_allocated` (reset per probe), on CPU peak RSS of a fresh subprocess per probe.

    pcbench bench step-cost [--device auto] [--repeats 20] [--threads 2] [--out results/bench]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from pcbench.spec import methods

from pcbench import models
from pcbench.util.atomic import write_json
from pcbench.bench import resolve_device, run_stem, save_figure, summary, sync
from pcbench.bench.machine import (REPO, contention, cpu_snapshot, finish, load_average, machine_info,
                                   others_busy_cores)
from pcbench.compress import importance
from pcbench.compress.plan import make_plan
from pcbench.spec.config import CompressSpec, ModelSpec, RunSpec
from pcbench.train.loop import Stepper, adamw_options, amp_ctx, lr_factor

METHODS = ("hpr", "pc", "naive")  # the JSON's keys; `naive` is the registered method `pc-naive`
REGISTERED = {"naive": "pc-naive"}
DEFAULT_CELLS = "1x8,1x32,1x128,16x8"


@dataclass(frozen=True)
class Cell:
    """`micro_batches` micro-batches of `rows` sequences per optimiser step."""

    micro_batches: int
    rows: int

    @property
    def total_rows(self) -> int:
        return self.micro_batches * self.rows

    def label(self, seq: int) -> str:
        tok = self.total_rows * seq
        size = f"{tok // 1024}k" if tok % 1024 == 0 else str(tok)
        return size if self.micro_batches == 1 else f"{size} ({self.micro_batches}x{self.rows})"


def parse_cells(text: str) -> list[Cell]:
    """`"1x8,16x8"` -> one micro-batch of 8 rows, 16 micro-batches of 8 rows."""
    from pcbench.spec.config import SpecError

    cells = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        n, x, r = part.partition("x")
        if not (x and n.isdigit() and r.isdigit() and int(n) >= 1 and int(r) >= 1):
            raise SpecError("--cells", f"bad cell {part!r}: want NxR, N micro-batches of R rows, both >= 1 (e.g. 1x8)")
        cells.append(Cell(int(n), int(r)))
    if not cells:
        raise SpecError("--cells", "no cell given")
    return cells


# ---------------------------------------------------------------------------------------------
# Building the methods


def build_base(model: str, vocab: int, seq: int, compression: float, seed: int):
    """(base model, plan): a seeded from-scratch base and a random-importance plan."""
    base = models.build_model(models.build_config(ModelSpec(name=model), vocab, seq), seed=seed)
    base.config.use_cache = False
    plan = make_plan(base, compression, importance.random(base, seed))
    return base, plan


def build_method(method: str, base, plan, device: torch.device, lr: float, total_steps: int, micro: int,
                 order: str = "autograd"):
    """(trainable, Stepper) for `method` (a key of `METHODS`), built by its registered builder
    (`pcbench.spec.methods`) and stepped as the training loop steps it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    name = REGISTERED.get(method, method)
    spec = RunSpec(compress=CompressSpec(method=name, sides="both", residual=True, order=order))
    trainable = methods.build(name, base, plan, spec, device)
    trainable.model.train()
    opt = torch.optim.AdamW(trainable.param_groups(0.1), lr=lr, **adamw_options(device))  # fused on CUDA
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, 0, 0.0, 0.1))
    return trainable, Stepper(trainable, trainable.network, opt, sched, micro=micro, amp=amp_ctx(device, "auto"))


def fixed_batch(rows: int, seq: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq + 1), generator=g).to(device)


# ---------------------------------------------------------------------------------------------
# Memory


def _status_bytes(key: str) -> int:
    """`VmRSS` / `VmHWM` of this process from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _settle_and_reset_peak() -> bool:
    """Free what can be freed (gc, malloc_trim), then reset the peak RSS (Linux clear_refs 5)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False



def memory_baseline(device: torch.device) -> int:
    """Bytes in use before a measurement: CUDA allocated memory, or this process's RSS on CPU
    (after settling and resetting the peak)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(device)
    _settle_and_reset_peak()
    return _status_bytes("VmRSS")

def probe(cfg: dict) -> dict:
    """Build one method for one cell alone and run `steps` steps; memory in MiB. CPU: RSS after
    imports and after the build, then the peak RSS (VmHWM, reset after the build) over the steps;
    CUDA: allocated before/after the build, then max allocated over the steps."""
    device = torch.device(cfg["device"])
    torch.set_num_threads(cfg["threads"])
    cell = Cell(**cfg["cell"])
    mib = 2.0 ** 20
    cuda = device.type == "cuda"
    start = memory_baseline(device)
    base, plan = build_base(cfg["model"], cfg["vocab"], cfg["seq"], cfg["compression"], cfg["seed"])
    trainable, stepper = build_method(cfg["method"], base, plan, device, cfg["lr"], cfg["steps"], cell.rows,
                                      cfg.get("order", "autograd"))
    batch = fixed_batch(cell.total_rows, cfg["seq"], cfg["vocab"], cfg["seed"], device)
    del base, plan  # a real run keeps only what the method holds (PC: the base tensors)
    if cuda:
        gc.collect()
        built = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        reset = _settle_and_reset_peak()
        built = _status_bytes("VmRSS")
    for step in range(cfg["steps"]):
        stepper(batch, step)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _status_bytes("VmHWM")
    out = {"persistent_mib": (built - start) / mib, "step_peak_mib": (peak - built) / mib,
           "peak_total_mib": (peak - start) / mib, "steps": cfg["steps"], "peak_reset_after_build": reset}
    if not cuda:
        out.update({"rss_after_imports_mib": start / mib, "rss_after_build_mib": built / mib,
                    "peak_rss_mib": peak / mib})
    return out


def measure_memory(cfg: dict) -> dict:
    """`probe` in-process on CUDA, in a fresh interpreter on CPU (peak RSS is per process)."""
    if cfg["device"].startswith("cuda"):
        return probe(cfg)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-m", "pcbench.bench.step_cost", "--probe", json.dumps(cfg)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


MEMORY_METHOD = {
    "cuda": "in-process per method and cell, alone on the device: torch.cuda.max_memory_allocated "
            "(peak stats reset after the build); persistent = allocated after build - before build",
    "cpu": "fresh subprocess per method and cell (gc + malloc_trim before each reading): persistent = "
           "RSS after the build (method, optimiser not yet stepped, base model freed except what the method "
           "holds) - RSS after imports; then the peak RSS is reset (/proc/self/clear_refs 5) and "
           "step_peak = peak RSS (VmHWM, = ru_maxrss) over the steps - RSS after build (includes AdamW "
           "state, allocated at the first step); peak_total = peak RSS - RSS after imports. RSS also "
           "counts freed-but-cached malloc pages, so these bound live tensor bytes from above",
}


# ---------------------------------------------------------------------------------------------
# The benchmark


def bootstrap_ci(stat: Callable[..., float], *samples: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of `stat(*samples)`, each sample resampled independently."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(x, float) for x in samples]
    draws = [stat(*(a[rng.integers(0, len(a), len(a))] for a in arrays)) for _ in range(n)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def with_ci(values: list[float]) -> dict:
    """`summary` plus the bootstrap interval of the median."""
    return {**summary(values), "median_ci95": bootstrap_ci(np.median, values)}


class PartTimer:
    """Seconds of the fixed part of each PC step (`before_step`, `after_backward`, wrapped on the
    instance) and of each optimiser step (optimizer step hooks), device-synchronised."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, list[float]] = {}
        self.active = False

    def _record(self, part: str, seconds: float) -> None:
        if self.active:
            self.seconds.setdefault(part, []).append(seconds)

    def wrap(self, obj, name: str, part: str) -> None:
        inner = getattr(obj, name)

        @functools.wraps(inner)
        def timed(*a, **kw):
            sync(self.device)
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            sync(self.device)
            self._record(part, time.perf_counter() - t0)
            return out

        setattr(obj, name, timed)

    def optimiser(self, opt: torch.optim.Optimizer, part: str) -> None:
        t0 = [0.0]

        def pre(*_):
            sync(self.device)
            t0[0] = time.perf_counter()

        def post(*_):
            sync(self.device)
            self._record(part, time.perf_counter() - t0[0])

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)


def time_cell(cell: Cell, base, plan, device: torch.device, args: argparse.Namespace):
    """(measurements per method, load samples, FLOP facts): warm-up, then `repeats` interleaved
    timed steps of every method on one fixed batch, order rotated per repeat; PC's materialise and
    push and every method's optimiser step timed inside those steps."""
    total_steps = args.warmup + args.repeats
    built = {m: build_method(m, base, plan, device, args.lr, total_steps, cell.rows, args.order) for m in METHODS}
    pc = built["pc"][0]
    parts = PartTimer(device)
    parts.wrap(pc, "before_step", "pc/materialise")
    parts.wrap(pc, "after_backward", "pc/push")
    for m in METHODS:
        parts.optimiser(built[m][1].opt, f"{m}/optimiser")
    info = {"small_config": built["hpr"][0].model.config, "fixed": pc.fixed_flops_per_step(),
            "materialise": sum(t.flops() for t in pc.tensors.values()),
            "cache_mib": pc.step_cache_bytes() / 2.0 ** 20}
    info["per_token"] = models.flops_per_token(info["small_config"], args.seq)
    batch = fixed_batch(cell.total_rows, args.seq, args.vocab, args.seed, device)
    losses: dict[str, list[float]] = {m: [] for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    others: dict[str, list[Optional[float]]] = {m: [] for m in METHODS}
    for m in METHODS:
        for i in range(args.warmup):
            losses[m].append(built[m][1](batch, i)[0])
    loads = []
    parts.active = True
    for r in range(args.repeats):
        for m in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
            sync(device)
            snap, t0 = cpu_snapshot(), time.perf_counter()
            loss, _ = built[m][1](batch, args.warmup + r)
            sync(device)
            times[m].append(time.perf_counter() - t0)
            others[m].append(others_busy_cores(snap, cpu_snapshot()))
            losses[m].append(loss)
        loads.append(load_average())
    del built, pc
    gc.collect()
    tokens = cell.total_rows * args.seq
    sec = parts.seconds
    fixed = [a + b for a, b in zip(sec["pc/materialise"], sec["pc/push"])]
    meas = {m: {"step_seconds": with_ci(times[m]), "optimiser_seconds": with_ci(sec[f"{m}/optimiser"]),
                "losses": losses[m], "others_busy_cores": others[m],
                "tokens_per_s": tokens / summary(times[m])["median"]} for m in METHODS}
    meas["pc"].update({"fixed_seconds": with_ci(fixed), "materialise_seconds": with_ci(sec["pc/materialise"]),
                       "push_seconds": with_ci(sec["pc/push"])})
    return meas, loads, info, {"fixed": fixed, "hpr": times["hpr"], "pc": times["pc"]}


def ratio_of_medians(a, b) -> float:
    return float(np.median(a) / np.median(b))


def one_plus_fixed(fixed, hpr) -> float:
    return float(1 + np.median(fixed) / np.median(hpr))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cells = parse_cells(args.cells)
    machine = machine_info()
    machine["contention_warning"] = contention(machine, args.threads)
    if machine["contention_warning"]:
        print(f"warning: {machine['contention_warning']}", flush=True)
    base, plan = build_base(args.model, args.vocab, args.seq, args.compression, args.seed)
    results = []
    for cell in cells:
        tokens = cell.total_rows * args.seq
        meas, loads, info, raw = time_cell(cell, base, plan, device, args)
        per_token, fixed, materialise = info["per_token"], info["fixed"], info["materialise"]
        small_cfg = info["small_config"]
        med = {m: meas[m]["step_seconds"]["median"] for m in METHODS}
        fixed_s = meas["pc"]["fixed_seconds"]["median"]
        token_flops = per_token * tokens
        rec = {
            "cell": {**asdict(cell), "label": cell.label(args.seq), "tokens": tokens},
            "measurements": meas,
            "load_during": loads,
            "flops": {"per_token": per_token, "tokens_x_per_token": token_flops, "pc_fixed_per_step": fixed,
                      "materialise_once": materialise,
                      "naive_extra_per_step": 3 * materialise * cell.micro_batches,
                      "hpr_achieved_per_s": token_flops / med["hpr"]},
            "ratios": {
                "pc_over_hpr": med["pc"] / med["hpr"],
                "pc_over_hpr_ci95": bootstrap_ci(ratio_of_medians, raw["pc"], raw["hpr"]),
                "pc_over_hpr_fixed": 1 + fixed_s / med["hpr"],
                "pc_over_hpr_fixed_ci95": bootstrap_ci(one_plus_fixed, raw["fixed"], raw["hpr"]),
                "pc_over_hpr_predicted": 1 + fixed / token_flops,
                "naive_over_pc": med["naive"] / med["pc"],
                "naive_over_pc_predicted": (token_flops + 3 * materialise * cell.micro_batches) / (token_flops + fixed),
                "pc_over_hpr_of_mins": meas["pc"]["step_seconds"]["min"] / meas["hpr"]["step_seconds"]["min"],
                "naive_over_pc_of_mins": meas["naive"]["step_seconds"]["min"] / meas["pc"]["step_seconds"]["min"],
            },
            "seconds": {"pc_minus_hpr": med["pc"] - med["hpr"],
                        "pc_minus_hpr_ci95": bootstrap_ci(lambda a, b: float(np.median(a) - np.median(b)),
                                                          raw["pc"], raw["hpr"]),
                        "pc_fixed_measured": fixed_s, "pc_fixed_measured_ci95": meas["pc"]["fixed_seconds"]["median_ci95"],
                        "pc_fixed_predicted_at_hpr_rate": fixed * med["hpr"] / token_flops,
                        "optimiser_pc_minus_hpr": meas["pc"]["optimiser_seconds"]["median"]
                        - meas["hpr"]["optimiser_seconds"]["median"]},
            "pc_step_cache_mib": info["cache_mib"],
        }
        if args.memory != "off":
            rec["memory"] = {m: measure_memory({
                "model": args.model, "vocab": args.vocab, "seq": args.seq, "compression": args.compression,
                "seed": args.seed, "lr": args.lr, "threads": args.threads, "device": str(device), "order": args.order,
                "cell": asdict(cell), "method": m, "steps": max(2, args.warmup + 1)}) for m in METHODS}
        results.append(rec)
        print(row(rec), flush=True)
    config = {**{k: v for k, v in vars(args).items() if k not in ("out", "probe")}, "device": str(device),
              "methods": list(METHODS), "sides": "both", "residual": True, "importance": "random",
              "threading_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME",
                                                           "MKL_NUM_THREADS") if k in os.environ},
              "plan": {k: v for k, v in plan.to_dict().items() if k != "keep"},
              "base_params": models.count_params(base), "small_params": models.count_params(small_cfg),
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "batch_source": "one fixed random token batch per cell, the same for every method and step",
              "interleave": "per repeat one step of each method, order rotated; median over repeats",
              "fixed_method": "PC's before_step (materialise) + after_backward (push), timed inside every "
                              "timed PC step with device syncs; pc_over_hpr_fixed = 1 + median fixed / "
                              "median HPR step; optimiser seconds from optimizer step hooks",
              "interval": "95% percentile bootstrap (2000 resamples, each method's repeats resampled "
                          "independently) of the median or of the ratio of medians",
              "memory_method": MEMORY_METHOD[device.type] if args.memory != "off" else None,
              "flop_model": "per token: models.flops_per_token of the small model (3x forward matmuls); "
                            "PC fixed: Projected.fixed_flops_per_step = materialise once + closed-form "
                            "push (ProjectedTensor.push_flops); naive: 3x materialise per micro-batch "
                            "(forward + backward)"}
    machine["load_during"] = [l for r in results for l in r["load_during"]]
    return {"benchmark": "step-cost", "config": config, "machine": finish(machine), "cells": results}


# ---------------------------------------------------------------------------------------------
# Output


CONTENDED = 0.25  # other processes' mean busy cores during a step above which it counts as contended
HEADER = (f"{'cell':<12} {'tokens':>6} {'hpr s':>7} {'pc s':>7} {'naive s':>7} {'fixed s':>7} "
          f"{'pc/hpr [95%]':>19} {'1+fixed/hpr [95%]':>19} {'pred':>6} {'naive/pc':>8} {'pred':>6}  "
          f"step-peak MiB hpr/pc/naive  contended")


def _ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f},{ci[1]:.3f}]"


def row(rec: dict) -> str:
    m, r = rec["measurements"], rec["ratios"]
    s = " ".join(f"{m[k]['step_seconds']['median']:>7.3f}" for k in METHODS)
    mem = ""
    if "memory" in rec:
        mem = "/".join(f"{rec['memory'][k]['step_peak_mib']:.0f}" for k in METHODS)
    busy = [b for k in METHODS for b in m[k]["others_busy_cores"]]
    hit = sum(1 for b in busy if b is not None and b > CONTENDED)
    return (f"{rec['cell']['label']:<12} {rec['cell']['tokens']:>6} {s} {m['pc']['fixed_seconds']['median']:>7.3f} "
            f"{_ci(r['pc_over_hpr'], r['pc_over_hpr_ci95']):>19} "
            f"{_ci(r['pc_over_hpr_fixed'], r['pc_over_hpr_fixed_ci95']):>19} "
            f"{r['pc_over_hpr_predicted']:>6.3f} {r['naive_over_pc']:>8.3f} {r['naive_over_pc_predicted']:>6.3f}  "
            f"{mem:<27}  {hit}/{len(busy)}")


def table(rec: dict) -> str:
    lines = [HEADER] + [row(c) for c in rec["cells"]]
    single = [c for c in rec["cells"] if c["cell"]["micro_batches"] == 1] or rec["cells"]
    big = max(single, key=lambda c: c["cell"]["tokens"])
    r = big["ratios"]
    lines.append(f"PC/HPR at the largest one-micro-batch step ({big['cell']['tokens']} tokens): "
                 f"{_ci(r['pc_over_hpr'], r['pc_over_hpr_ci95'])} whole step, "
                 f"{_ci(r['pc_over_hpr_fixed'], r['pc_over_hpr_fixed_ci95'])} as 1 + fixed/HPR, "
                 f"{r['pc_over_hpr_predicted']:.3f} predicted")
    lines.append(f"load before {rec['machine']['load_before']} after {rec['machine']['load_after']}")
    return "\n".join(lines)


def plot(rec: dict, path: Path) -> None:
    """Left: PC/HPR step time vs tokens per step, with the predicted curve; right: naive/cost-free."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = rec["cells"]
    toks = sorted({c["cell"]["tokens"] for c in cells})
    per_tok, fixed = cells[0]["flops"]["per_token"], cells[0]["flops"]["pc_fixed_per_step"]
    lo, hi = toks[0] / 2, toks[-1] * 2
    xs = [lo * (hi / lo) ** (i / 99) for i in range(100)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "pc_over_hpr", "PC (cost-free) / HPR step time"),
              (axes[1], "naive_over_pc", "naive PC / cost-free PC step time"))
    for ax, key, title in panels:
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        if key == "pc_over_hpr":
            ax.plot(xs, [1 + fixed / (per_tok * x) for x in xs], color="C1", lw=1.2,
                    label="predicted: 1 + fixed / (per-token x tokens)")
        ax.plot([c["cell"]["tokens"] for c in cells], [c["ratios"][key + "_predicted"] for c in cells], "o",
                color="C1", mfc="none", ms=8, label="predicted (FLOPs), per cell")
        one = [c for c in cells if c["cell"]["micro_batches"] == 1]
        series = [(key, "C0", "o-", "measured whole step, 1 micro-batch")]
        if key == "pc_over_hpr":
            series.append(("pc_over_hpr_fixed", "C3", "^--", "measured 1 + fixed / HPR step, 1 micro-batch"))
        for k, color, style, label in series:
            if not one:
                break
            ys = [c["ratios"][k] for c in one]
            err = None
            if k + "_ci95" in one[0]["ratios"]:
                err = [[y - c["ratios"][k + "_ci95"][0] for y, c in zip(ys, one)],
                       [c["ratios"][k + "_ci95"][1] - y for y, c in zip(ys, one)]]
            ax.errorbar([c["cell"]["tokens"] for c in one], ys, yerr=err, fmt=style, color=color, ms=6,
                        capsize=3, label=label + (" (95% CI)" if err else ""))
        for c in cells:
            if c["cell"]["micro_batches"] > 1:
                ax.plot(c["cell"]["tokens"], c["ratios"][key], "s", color="C2", ms=7,
                        label=f"measured, {c['cell']['micro_batches']} micro-batches of {c['cell']['rows']} rows")
            ax.annotate(f"{c['ratios'][key]:.2f}", (c["cell"]["tokens"], c["ratios"][key]),
                        textcoords="offset points", xytext=(7, -12 if c["cell"]["micro_batches"] > 1 else 5),
                        fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(toks, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in toks])
        ax.set_xlabel("tokens per optimiser step (log scale)")
        ax.set_ylabel("step-time ratio (medians over repeats)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    m, c = rec["machine"], rec["config"]
    hw = m["cuda_device"] if c["device"].startswith("cuda") else f"{m['cpu_model']}, {m['torch_threads']} threads"
    load = f"load {m['load_before'][0]} -> {m['load_after'][0]}" if m["load_before"] and m["load_after"] else ""
    fig.suptitle(f"{c['model']}, {c['compression']:.0%} compression, {c['device']} ({hw}); {load}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcbench bench step-cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per method and cell")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method and cell")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--model", default="llama-bench")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--compression", type=float, default=0.5)
    p.add_argument("--cells", default=DEFAULT_CELLS, help="NxR: N micro-batches of R rows per step")
    p.add_argument("--order", choices=("autograd", "flops"), default="autograd",
                   help="PC's products per two-sided tensor (compress.order)")
    p.add_argument("--memory", default="on", choices=["on", "off"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.probe:  # internal: one memory probe in this fresh process
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    print(HEADER, flush=True)
    rec = run(args)
    stem = run_stem(Path(args.out), "step-cost")
    json_path, png_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".png")
    plot(rec, png_path)
    rec["png"] = png_path.name
    write_json(json_path, rec)
    print(table(rec))
    print(f"wrote {json_path} and {png_path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
