"""Training tokens/s of our loop's step (`Stepper` over `Direct`) against a plain hand-written
torch loop on the same model config, batch and threads, interleaved in one process.

    pcbench bench throughput [--model gpt2-small] [--seq 128] [--batch 32] [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pcbench import models
from pcbench.util.atomic import write_json
from pcbench.bench import resolve_device, run_stem, summary, sync
from pcbench.bench.machine import contention, cpu_snapshot, finish, load_average, machine_info, others_busy_cores
from pcbench.spec.config import ModelSpec
from pcbench.train.loop import Stepper, amp_ctx, lr_factor
from pcbench.compress.trainable import Direct

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s; first matching substring of the device name.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200 NVL", 835e12),
             ("H200", 989.4e12), ("A100", 312e12), ("B200", 2250e12), ("L40S", 362e12)]


def peak_bf16(device_name: Optional[str]) -> Optional[float]:
    for key, peak in PEAK_BF16:
        if device_name and key in device_name:
            return peak
    return None


def schedule(opt, total: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, 0, 0.0, 0.1))


def ours(config, device: torch.device, lr: float, total: int, seed: int,
         rows: int) -> Callable[[torch.Tensor, int], float]:
    """The training loop's step: Stepper over Direct(model), AdamW groups + LambdaLR, amp on CUDA."""
    model = models.build_model(config, seed=seed).to(device)
    model.train()
    trainable = Direct(model)
    opt = torch.optim.AdamW(trainable.param_groups(0.1), lr=lr)
    stepper = Stepper(trainable, model, opt, schedule(opt, total), micro=rows, amp=amp_ctx(device, "auto"))
    return lambda batch, step: stepper(batch, step)[0]


def plain(config, device: torch.device, lr: float, total: int, seed: int) -> Callable[[torch.Tensor, int], float]:
    """Forward, CE loss, backward, clip, AdamW step, zero_grad; bf16 autocast on CUDA."""
    model = models.build_model(config, seed=seed).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = schedule(opt, total)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def step(batch: torch.Tensor, _step: int) -> torch.Tensor:
        with amp():
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()  # no host sync here: a plain loop would not force one

    return step


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    spec = ModelSpec(name=args.model)
    vocab = args.vocab or models.vocab_size_for(models.resolved_preset(spec).tokenizer) or 4096
    config = models.build_config(spec, vocab, args.seq)
    machine = machine_info()
    machine["contention_warning"] = contention(machine, args.threads)
    if machine["contention_warning"]:
        print(f"warning: {machine['contention_warning']}", flush=True)
    total = args.warmup + args.steps
    loops = {"ours": ours(config, device, args.lr, total, args.seed, args.batch),
             "plain": plain(config, device, args.lr, total, args.seed)}
    g = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(device)  # one fixed batch
    tokens = args.batch * args.seq
    losses: dict[str, list[float]] = {k: [] for k in loops}
    times: dict[str, list[float]] = {k: [] for k in loops}
    others: dict[str, list[Optional[float]]] = {k: [] for k in loops}
    load_during = []
    for name in loops:  # warm-up, excluded
        for i in range(args.warmup):
            losses[name].append(float(loops[name](batch, i)))
    step = args.warmup
    repeats = max(1, -(-args.steps // args.block))
    for r in range(repeats):
        order = list(loops) if r % 2 == 0 else list(reversed(loops))  # A B, B A, ...
        for name in order:
            sync(device)
            snap, t0 = cpu_snapshot(), time.perf_counter()
            for i in range(args.block):
                out = loops[name](batch, step + i)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            others[name].append(others_busy_cores(snap, cpu_snapshot()))
            losses[name].append(float(out))
        step += args.block
        load_during.append(load_average())
    meas = {}
    for name in loops:
        tps = [tokens * args.block / t for t in times[name]]
        meas[name] = {"seconds_per_repeat": summary(times[name]), "tokens_per_s": summary(tps),
                      "losses": losses[name], "others_busy_cores": others[name]}
    flops_tok = models.flops_per_token(config, args.seq)
    derived = {
        "ours_over_plain_tokens_per_s": meas["ours"]["tokens_per_s"]["median"] / meas["plain"]["tokens_per_s"]["median"],
        "ours_over_plain_seconds": meas["ours"]["seconds_per_repeat"]["median"] / meas["plain"]["seconds_per_repeat"]["median"],
        "flops_per_token": flops_tok,
        "achieved_flops_per_s": {k: flops_tok * meas[k]["tokens_per_s"]["median"] for k in loops},
    }
    peak = peak_bf16(machine["cuda_device"]) if device.type == "cuda" else None
    if peak:
        derived["peak_bf16_flops"] = peak
        derived["mfu"] = {k: flops_tok * meas[k]["tokens_per_s"]["median"] / peak for k in loops}
    machine["load_during"] = load_during
    config_rec = {**{k: v for k, v in vars(args).items() if k != "out"}, "vocab": vocab, "device": str(device),
                  "tokens_per_step": tokens, "repeats": repeats, "steps_per_repeat": args.block,
                  "params": models.count_params(config),
                  "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
                  "batch_source": "one fixed random token batch [batch, seq+1] reused every step",
                  "interleave": "repeats alternate A B / B A; median over repeats",
                  "notes": "ours: Stepper (one host sync per step for the loss and grad norm, "
                           "decay/no-decay groups); plain: one AdamW group, no host sync"}
    return {"benchmark": "throughput", "config": config_rec, "machine": finish(machine),
            "measurements": meas, "derived": derived}


def table(rec: dict) -> str:
    m, d = rec["measurements"], rec["derived"]
    lines = [f"{'loop':<6} {'tokens/s (median)':>18} {'min s/repeat':>13} {'max s/repeat':>13}"]
    for k in ("ours", "plain"):
        s = m[k]["seconds_per_repeat"]
        lines.append(f"{k:<6} {m[k]['tokens_per_s']['median']:>18,.0f} {s['min']:>13.4f} {s['max']:>13.4f}")
    lines.append(f"ours/plain tokens/s = {d['ours_over_plain_tokens_per_s']:.3f}")
    if "mfu" in d:
        lines.append("MFU: " + ", ".join(f"{k} {v:.1%}" for k, v in d["mfu"].items()))
    lines.append(f"load before {rec['machine']['load_before']} after {rec['machine']['load_after']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcbench bench throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--vocab", type=int, default=None, help="default: the preset tokenizer's size")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per loop")
    p.add_argument("--block", type=int, default=1, help="steps per timed repeat")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    rec = run(args)
    path = run_stem(Path(args.out), "throughput", ".json")
    write_json(path, rec)
    print(table(rec))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
