"""The distillation table: HPR / HPR + KD / PC / PC + KD per cell, matched on base, level, tokens and seed."""

from __future__ import annotations

from pathlib import Path

from test_report import GRID, LOSSES, _final, _row, _run, make_store

from pcbench.report import build_report

KD = {"hpr": 2.570, "pc": 2.590}  # distilled losses at 80:1, 4k tokens (plain: HPR 2.600, PC 2.580)


def _add_distilled(root: Path) -> None:
    for i, (method, loss) in enumerate(sorted(KD.items())):
        rid = f"distill-r80-{method}-4000"
        spec = {"compress": {"method": method, "compression": 0.5, "importance": "random", "distill": 0.5},
                "model": {"name": "hf", "path": "run:base-r80"}, "train": {"tokens": 4000, "seed": 0},
                "optim": {"lr": 0.001}}
        _run(root, rid, "distill", {"ratio": 80, "method": method, "compression": 0.5, "tokens": 4000,
                                    "distill": 0.5}, spec, "completed", _final(method, loss, 4000, 500),
             deps=["base-r80"], t=80 + i)


def test_distilled_runs_sit_beside_the_plain_ones(tmp_path: Path):
    root = make_store(tmp_path / "results")
    _add_distilled(root)
    out = build_report(tmp_path / "results", GRID, tmp_path / "out")
    md = (out / "tables" / "distill.md").read_text()
    row = _row(md, "80:1 base", "50%", "4k")
    hpr, pc = LOSSES[(80, "hpr", 4000, 0)], LOSSES[(80, "pc", 4000, 0)]
    assert row[3:6] == [f"{hpr:.4f}", f"{KD['hpr']:.4f}", f"{KD['hpr'] - hpr:+.4f}"]
    assert row[6:9] == [f"{pc:.4f}", f"{KD['pc']:.4f}", f"{KD['pc'] - pc:+.4f}"]
    assert row[9] == f"{pc - hpr:+.4f} / {KD['pc'] - KD['hpr']:+.4f}"
    assert "HPR: distillation lowered the loss in 1 of 1 cells" in md
    assert "PC: distillation lowered the loss in 0 of 1 cells" in md
    assert "## Distillation baselines" in (out / "REPORT.md").read_text()


def test_no_distillation_table_without_distilled_runs(tmp_path: Path):
    make_store(tmp_path / "results")
    out = build_report(tmp_path / "results", GRID, tmp_path / "out")
    assert not (out / "tables" / "distill.md").exists()
