"""The authors' optimiser settings: weight decay on norms as an option, warm-up in steps, and the
paper grids using betas (0.9, 0.999), decay on norms and step warm-ups, each value with its source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

from pcbench.grid import load_grid
from pcbench.train.loop import lr_factor
from pcbench.compress.trainable import Direct, decay_groups

ROOT = Path(__file__).resolve().parents[1]


def _toy() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4, bias=True), nn.LayerNorm(4))


def test_decay_norms_puts_vectors_under_weight_decay():
    m = _toy()
    default = decay_groups(m.named_parameters(), 0.1)
    assert [(g["weight_decay"], len(g["params"])) for g in default] == [(0.1, 1), (0.0, 3)]
    everything = Direct(m).param_groups(0.1, decay_norms=True)
    assert [(g["weight_decay"], len(g["params"])) for g in everything] == [(0.1, 4)]
    assert [(g["weight_decay"], len(g["params"])) for g in Direct(m).param_groups(0.1)] == [(0.1, 1), (0.0, 3)]


def test_warmup_in_steps_and_fraction():
    # 40 of 2048 steps, as the authors' 1B configs: from 0.1 lr at step 0 to the peak at step 40
    assert lr_factor(0, 2048, 40, 0.1, 0.1) == pytest.approx(0.1)
    assert lr_factor(20, 2048, 40, 0.1, 0.1) == pytest.approx(0.55)
    assert lr_factor(40, 2048, 40, 0.1, 0.1) == pytest.approx(1.0)
    # a fraction < 1 is unchanged: 2% of 100 steps = 2 steps
    assert lr_factor(1, 100, 0.02, 0.1, 0.1) == pytest.approx(0.55)
    assert lr_factor(2, 100, 0.02, 0.1, 0.1) == pytest.approx(1.0)


@pytest.mark.parametrize("name,warmup", [("paper_gpt2", 80), ("paper_llama3_1b", 40)])
def test_paper_grids_use_the_authors_optimiser(name, warmup):
    path = ROOT / "experiments" / f"{name}.yaml"
    grid = load_grid(path)
    train = [r for r in grid.runs if r.kind == "train"]
    assert train
    for r in train:
        o = r.spec.optim
        assert (o.beta1, o.beta2, o.eps, o.weight_decay) == (0.9, 0.999, 1e-8, 0.1)
        assert o.decay_norms is True and o.warmup == warmup and o.warmup_start == 0.1
    text = path.read_text()
    for key in ("beta1", "beta2", "eps", "weight_decay", "decay_norms", "warmup", "warmup_start"):
        line = next(ln for ln in text.splitlines() if re.match(rf"\s+{key}:", ln))
        assert "#" in line, f"{name}: {key} names no source"
