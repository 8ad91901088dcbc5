#!/usr/bin/env python
"""PC/HPR step time predicted from FLOPs for the GPU check's 262k-token cell (CPU, ~1 min):
1 + PC's fixed-part FLOPs per step / the small model's token FLOPs per step, the figure the GPU
check reports beside its measurement as `pc_over_hpr_predicted` (the fixed part at the same
efficiency as the training step).

  PYTHONPATH=. python scripts/predict-pc-overhead.py [--compression 0.5]
"""

from __future__ import annotations

import argparse
import json

import torch

from pcbench import models
from pcbench.bench import gpu_check
from pcbench.spec.config import ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compression", type=float, default=0.5)
    a = ap.parse_args()
    if not 0 < a.compression < 1:
        ap.error(f"--compression must be in (0, 1), got {a.compression}")
    s = gpu_check.FULL
    base, plan = gpu_check.base_and_plan(ModelSpec(name=s.model), s.vocab, s.seq, a.compression, 0, align=s.align)
    cpu = torch.device("cpu")
    pc, _ = gpu_check.build_method("pc", base, plan, cpu, 1e-4, 1000, 8)
    hpr, _ = gpu_check.build_method("hpr", base, plan, cpu, 1e-4, 1000, 8)
    fixed = pc.fixed_flops_per_step()
    per_token = models.flops_per_token(hpr.model.config, s.seq)
    print(json.dumps({"model": s.model, "compression": a.compression, "align": s.align, "seq": s.seq,
                      "tokens_per_step": s.step_tokens, "small_parameters": sum(p.numel() for p in hpr.model.parameters()),
                      "pc_fixed_flops_per_step": fixed, "token_flops_per_step": per_token * s.step_tokens,
                      "pc_over_hpr_predicted": 1 + fixed / (per_token * s.step_tokens)}, indent=1))


if __name__ == "__main__":
    main()
