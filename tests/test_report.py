"""Report: tables/trends from a hand-made store, verdicts, determinism, the paper's numbers, store-only reads."""

from __future__ import annotations

import builtins
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pcbench.report import build_report, reference
from pcbench.report.stats import ols_slope, t975

GRID = "toy"
# (ratio, method, tokens, seed) -> train loss (last 100); gap = PC - HPR per cell:
#   20:1: +0.010, +0.005, +0.001 at 1k/2k/4k      80:1: -0.010, -0.015 (seeds -0.01, -0.02), -0.020
LOSSES = {
    (20, "hpr", 1000, 0): 3.000, (20, "pc", 1000, 0): 3.010,
    (20, "hpr", 2000, 0): 2.900, (20, "pc", 2000, 0): 2.905,
    (20, "hpr", 4000, 0): 2.800, (20, "pc", 4000, 0): 2.801,
    (20, "hpr", 8000, 0): 2.750,                      # its PC partner failed
    (80, "hpr", 1000, 0): 2.800, (80, "pc", 1000, 0): 2.790,
    (80, "hpr", 2000, 0): 2.700, (80, "pc", 2000, 0): 2.690,
    (80, "hpr", 2000, 1): 2.720, (80, "pc", 2000, 1): 2.700,
    (80, "hpr", 4000, 0): 2.600, (80, "pc", 4000, 0): 2.580,
}


def _w(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, sort_keys=True))


def _wl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _final(kind: str, loss: float, tokens: int, params: int, fixed: float = 0.0) -> dict:
    steps = max(tokens // 100, 1)
    return {"kind": kind, "steps": steps, "tokens": tokens, "train_loss_last100": loss, "last_k": 100,
            "final_train_loss": loss, "heldout_loss": loss + 0.5, "train_seconds": tokens / 1000,
            "wall_seconds": tokens / 1000 + 1, "tokens_per_s": 1000.0, "flops_per_token": 6 * params,
            "fixed_flops_per_step": fixed, "train_flops": 6 * params * tokens + fixed * steps,
            "model": {"params": {"total": params}, "d_model": 8, "d_ff": 32},
            "base": {"params": {"total": 1000}}, "plan": {"compression": 0.5, "achieved": 0.5}}


def _run(root: Path, rid: str, stage: str, labels: dict, spec: dict, state: str, final=None, kind="train",
         deps=(), error=None, t=0.0) -> None:
    d = root / "runs" / rid
    _w(d / "run.json", {"id": rid, "stage": stage, "kind": kind, "labels": labels, "spec": spec,
                        "deps": list(deps), "tune": None})
    status = {"state": state, "time": 1_800_000_000.0 + t, "started": 1_800_000_000.0 + t - 5}
    if error:
        status["error"] = error
    _w(d / "status.json", status)
    if final is not None:
        _w(d / "final.json", final)
    events = root / "events.jsonl"
    with open(events, "a") as f:
        f.write(json.dumps({"run": rid, "state": "running", "time": 1_800_000_000.0 + t - 5}) + "\n")
        f.write(json.dumps({"run": rid, "state": state, "time": 1_800_000_000.0 + t}) + "\n")


def make_store(results: Path, swap: bool = False, grid: str = GRID) -> Path:
    """The fixture store; `swap` exchanges the HPR and PC numbers (every gap changes sign)."""
    root = results / grid
    for i, ratio in enumerate((20, 80)):
        _run(root, f"base-r{ratio}", "base", {"ratio": ratio},
             {"compress": None, "model": {"name": "tiny"}, "train": {"tokens": ratio * 1000, "seed": 0},
              "optim": {"lr": 0.01}}, "completed", _final("pretrain", 4.0 - ratio / 100, ratio * 1000, 1000),
             t=i)
    for i, ((ratio, method, tokens, seed), loss) in enumerate(sorted(LOSSES.items())):
        if swap:
            loss = LOSSES.get((ratio, "pc" if method == "hpr" else "hpr", tokens, seed), loss)
        rid = f"compress-r{ratio}-{method}-{tokens}-s{seed}"
        spec = {"compress": {"method": method, "compression": 0.5, "importance": "random"},
                "model": {"name": "hf", "path": f"run:base-r{ratio}"},
                "train": {"tokens": tokens, "seed": seed}, "optim": {"lr": 0.001 if method == "pc" else 0.004}}
        _run(root, rid, "compress", {"ratio": ratio, "method": method, "compression": 0.5, "tokens": tokens,
                                     "seed": seed}, spec, "completed",
             _final(method, loss, tokens, 500, fixed=1e4 if method == "pc" else 0.0), deps=[f"base-r{ratio}"],
             t=10 + i)
        d = root / "runs" / rid
        _wl(d / "metrics.jsonl", [{"step": s, "loss": loss + 1 / s, "loss_avg": loss + 1 / s, "lr": 0.001,
                                   "tokens": s * 100, "seconds": s} for s in (1, 2, 5, 10)])
        if method == "pc":
            _wl(d / "recovery.jsonl", [{"step": 0, "recovery/d_model/mean": 0.0, "recovery/d_ff/mean": 0.0},
                                       {"step": 10, "recovery/d_model/mean": 0.02, "recovery/d_ff/mean": 0.04,
                                        "tensors": {"w": {"in": 0.02}}}])
    _run(root, "compress-r20-pc-8000-s0", "compress", {"ratio": 20, "method": "pc", "compression": 0.5,
                                                       "tokens": 8000, "seed": 0},
         {"compress": {"method": "pc", "compression": 0.5}, "model": {"path": "run:base-r20"},
          "train": {"tokens": 8000}}, "failed", error="RuntimeError: out of memory", deps=["base-r20"], t=50)
    for i, (method, avg) in enumerate((("hpr", 0.40), ("pc", 0.45))):
        parent = f"compress-r80-{method}-4000-s0"
        rid = f"eval-{method}"
        _run(root, rid, "eval", {"ratio": 80, "method": method, "compression": 0.5, "tokens": 4000, "seed": 0},
             {"model": f"run:{parent}", "tasks": ["a", "b"]}, "completed", kind="eval", deps=[parent], t=60 + i)
        _w(root / "runs" / rid / "eval.json", {"model": parent, "parent": parent, "average": avg,
                                               "primary": {"a": "acc", "b": "acc"},
                                               "tasks": {"a": {"acc": avg - 0.1}, "b": {"acc": avg + 0.1}}})
    return root


def _row(md: str, *starts: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:len(starts)] == list(starts):
            return cells
    raise AssertionError(f"no row {starts} in\n{md}")


@pytest.fixture()
def report(tmp_path: Path) -> Path:
    make_store(tmp_path / "results")
    return build_report(tmp_path / "results", GRID, tmp_path / "out")


def test_pair_table_cells_means_std_n_and_better_mark(report: Path):
    md = (report / "tables" / "table_compress.md").read_text()
    header = _row(md, "compression", "ratio", "method")
    assert header[3:] == ["1k", "2k", "4k", "8k"]
    hpr80, pc80 = _row(md, "50%", "80:1", "HPR"), _row(md, "50%", "80:1", "PC")
    # two seeds at 80:1, 2k: HPR 2.70/2.72, PC 2.69/2.70 -> mean ± s.d. (n=2); PC is the better one
    assert hpr80[4] == f"2.7100 ± {math.sqrt(2 * 0.01 ** 2):.4f} (n=2)"
    assert pc80[4] == f"**2.6950** ± {math.sqrt(2 * 0.005 ** 2):.4f} (n=2)"
    assert pc80[3] == "**2.7900**" and hpr80[3] == "2.8000"
    hpr20, pc20 = _row(md, "50%", "20:1", "HPR"), _row(md, "50%", "20:1", "PC")
    assert hpr20[3:6] == ["**3.0000**", "**2.9000**", "**2.8000**"]
    assert pc20[3:6] == ["3.0100", "2.9050", "2.8010"]
    assert hpr20[6] == "2.7500" and pc20[6] == ""          # no pair at 8k: not marked; the failed PC is absent
    csv = pd.read_csv(report / "tables" / "table_compress.csv")
    c = csv[(csv.ratio == 80) & (csv.tokens == 2000)].set_index("method")
    assert c.loc["hpr", "mean"] == pytest.approx(2.71) and c.loc["hpr", "n"] == 2
    assert c.loc["hpr", "std"] == pytest.approx(0.0141421356, abs=1e-9)
    assert c.loc["hpr", "seeds"] == "0,1"
    assert bool(c.loc["pc", "better"]) and not bool(c.loc["hpr", "better"])


def test_gaps_and_token_slope_equal_hand_computed(report: Path):
    gaps = pd.read_csv(report / "tables" / "gaps.csv")
    g = gaps[(gaps.ratio == 80) & (gaps.tokens == 2000)].iloc[0]
    assert g.gap == pytest.approx(-0.015) and g.n_pairs == 2
    assert g.gap_sd == pytest.approx(math.sqrt(2 * 0.005 ** 2))
    slopes = pd.read_csv(report / "tables" / "trend_tokens.csv").set_index("ratio")
    # OLS by hand on x = log2(tokens) = 9.97, 10.97, 11.97 (centred -1, 0, 1): slope = (y3 - y1) / 2
    assert slopes.loc[20, "slope"] == pytest.approx((0.001 - 0.010) / 2)
    assert slopes.loc[80, "slope"] == pytest.approx((-0.020 - -0.010) / 2)
    # 20:1 residuals: interval = slope ± t(0.975, 1) * se, se = sqrt(SSR / (k-2) / Sxx)
    y = [0.010, 0.005, 0.001]
    fit = [sum(y) / 3 + (-0.0045) * x for x in (-1, 0, 1)]
    se = math.sqrt(sum((a - b) ** 2 for a, b in zip(y, fit)) / 1 / 2)
    assert slopes.loc[20, "hi"] == pytest.approx(-0.0045 + 12.7062 * se)
    assert "OLS residual" in slopes.loc[20, "ci"]
    s, _ = ols_slope([math.log2(t) for t in (1000, 2000, 4000)], y)
    assert s == pytest.approx(-0.0045)


def test_verdicts_from_the_data_and_they_flip(tmp_path: Path, report: Path):
    text = (report / "REPORT.md").read_text()
    assert '"PC gains more over HPR on the 80:1 base than on the 20:1 base": SUPPORTED.' in text
    assert '"the PC gain grows with retraining tokens": SUPPORTED.' in text
    # (b) mean of the two cells' slopes with a t-interval over cells (df 1)
    m, sd = (-0.0045 - 0.005) / 2, abs(-0.0045 + 0.005) / math.sqrt(2)
    assert f"Mean slope = {m:+.4f} (95% CI {m - t975(1) * sd / math.sqrt(2):+.4f}" in text
    # (a) d = gap(80) - gap(20) = -0.020, -0.020, -0.021
    assert f"Mean d = {(-0.02 - 0.02 - 0.021) / 3:+.4f}" in text
    make_store(tmp_path / "swapped", swap=True)
    flipped = (build_report(tmp_path / "swapped", GRID, tmp_path / "out2") / "REPORT.md").read_text()
    assert '80:1 base than on the 20:1 base": NOT SUPPORTED.' in flipped
    assert '"the PC gain grows with retraining tokens": NOT SUPPORTED.' in flipped
    assert "Does not hold in 2 cell(s)" in flipped


def test_headline_counts_cells_and_gap_range(report: Path):
    text = (report / "REPORT.md").read_text()
    # gaps: 20:1 +0.010/+0.005/+0.001, 80:1 -0.010/-0.015/-0.020 -> PC wins 3 of 6, mean -0.029/6
    assert ("stage `compress`: PC has the lower loss in 3 of 6 cells; gap PC-HPR from -0.0200 to +0.0100 "
            f"(mean {-0.029 / 6:+.4f}); 20:1 base: PC better in 0 of 3, mean gap {0.016 / 3:+.4f}; "
            f"80:1 base: PC better in 3 of 3, mean gap {-0.045 / 3:+.4f}") in text


def test_busy_wall_time_is_the_union_of_run_intervals():
    from pcbench.report.markdown import busy_seconds

    ev = pd.DataFrame([
        {"run": "a", "state": "running", "time": 0.0}, {"run": "a", "state": "completed", "time": 10.0},
        {"run": "b", "state": "submitted", "time": 1.0},
        {"run": "b", "state": "running", "time": 5.0}, {"run": "b", "state": "failed", "time": 15.0},
        # an hour idle between two invocations, then c ran 20 s after a killed attempt
        {"run": "c", "state": "running", "time": 3600.0}, {"run": "c", "state": "running", "time": 3700.0},
        {"run": "c", "state": "completed", "time": 3720.0},
    ])
    assert busy_seconds(ev) == pytest.approx(15.0 + 20.0)


def test_report_contents_failed_runs_bases_evals_cost(report: Path):
    text = (report / "REPORT.md").read_text()
    assert "# pcbench report: grid `toy`" in text
    assert "compress-r20-pc-8000-s0" in text and "RuntimeError: out of memory" in text
    assert "- runs: 20 (completed: 19, failed: 1)" in text
    assert "wall time with at least one run running: " in text
    base = (report / "tables" / "base_models.md").read_text()
    assert _row(base, "base", "80:1")[5] == "3.2000"          # 4.0 - 80/100
    down = (report / "tables" / "downstream_compress.md").read_text()
    assert _row(down, "50%", "80:1", "PC")[3] == "**0.4500**"   # higher is better for evals
    cost = pd.read_csv(report / "tables" / "cost.csv").set_index("method")
    assert cost.loc["pc", "fixed_flops_per_step"] == 1e4 and cost.loc["hpr", "fixed_flops_per_step"] == 0
    lr = (report / "REPORT.md").read_text()
    assert "stage `compress`, PC: lr 0.001" in lr and "stage `compress`, HPR: lr 0.004" in lr
    for fig in ("loss_vs_tokens_compress.png", "gap_vs_tokens.png", "gap_vs_ratio.png", "downstream.png",
                "recovery.png", "curves.png"):
        assert (report / "figures" / fig).stat().st_size > 1000, fig


def test_second_build_is_byte_identical(tmp_path: Path, report: Path):
    def snapshot(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
                if p.is_file() and p.suffix in (".md", ".csv")}

    first = snapshot(report)
    assert "REPORT.md" in first and len(first) > 10
    again = build_report(tmp_path / "results", GRID, tmp_path / "out")
    assert snapshot(again) == first
    other = build_report(tmp_path / "results", GRID, tmp_path / "elsewhere")
    assert snapshot(other) == first


def test_reads_nothing_outside_the_store(tmp_path: Path, monkeypatch):
    store = make_store(tmp_path / "results")
    cwd = tmp_path / "cwd"
    make_store(cwd / "results", swap=True)                    # decoys: a different store and a grid YAML
    (cwd / "experiments").mkdir()
    (cwd / "experiments" / f"{GRID}.yaml").write_text("name: toy\n")
    (store / "grid.yaml").write_text("name: toy\nbroken: [\n")  # a grid YAML inside the store: never read
    monkeypatch.chdir(cwd)
    opened: list[str] = []
    real_open = io.open

    def spy(file, *a, **k):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.abspath(os.fspath(file)))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    out = build_report(tmp_path / "results", GRID, tmp_path / "out")
    monkeypatch.undo()
    data = [p for p in opened if p.endswith((".json", ".jsonl", ".yaml", ".yml"))]
    allowed = (str(store) + os.sep, str(reference.REFERENCE))
    assert data and all(p.startswith(allowed[0]) or p == allowed[1] for p in data), data
    assert str(store / "grid.yaml") not in opened
    assert "SUPPORTED." in (out / "REPORT.md").read_text() and not list(cwd.glob("paper_figures"))


def test_reference_transcription():
    a2 = reference.table_a2()
    cell = lambda df, **kv: df[pd.concat([df[k] == v for k, v in kv.items()], axis=1).all(axis=1)].iloc[0]  # noqa
    c = cell(a2, model="300M", ratio=80, compression=0.35, method="hpr", tokens=1.25e9)
    assert c.loss == 3.1759 and c.position == "inferred" and "Table A.2" in c.source
    c = cell(a2, model="300M", ratio=80, compression=0.35, method="hpr", tokens=2.5e9)
    assert math.isnan(c.loss) and c.position == "lost" and c.lost == "worse-of-pair"
    c = cell(a2, model="300M", ratio=80, compression=0.35, method="pc", tokens=10e9)
    assert c.loss == 3.0711 and c.position == "inferred"
    c = cell(a2, model="800M", ratio=80, compression=0.65, method="pc", tokens=7.5e9)
    assert c.loss == 2.9815 and c.position == "inferred"
    c = cell(a2, model="800M", ratio=80, compression=0.5, method="pc", tokens=1.25e9)
    assert c.loss == 3.0217 and c.position == "exact" and "3,0217" in c.note
    c = cell(a2, model="800M", ratio=80, compression=0.5, method="hpr", tokens=2.5e9)
    assert math.isnan(c.loss) and c.known_loss == 2.9733 and "Table 3" in c.known_from
    assert cell(a2, model="800M", ratio=20, compression=0.35, method="hpr", tokens=5e9).loss == 2.931
    assert cell(a2, model="300M", ratio=20, compression=0.65, method="pc", tokens=2.5e9).loss == 3.356
    assert len(a2) == 120 and a2.position.value_counts().to_dict() == {"exact": 65, "lost": 30, "inferred": 25}
    # every 80:1 column has exactly one of the pair
    r80 = a2[a2.ratio == 80].groupby(["model", "compression", "tokens"]).loss.count()
    assert (r80 == 1).all() and len(r80) == 30
    t1 = reference.table1()
    assert len(t1) == 60 and (t1.ratio == 80).all() and set(t1.table) == {"1"}
    t3 = reference.table3()
    assert cell(t3, importance="random", method="hpr", tokens=5e9).loss == 2.93
    assert t3[t3.importance == "magnitude"].loss.isna().all()
    assert cell(reference.base_losses(), model="300M", ratio=20).loss == 3.145
    p = reference.poster()
    assert cell(p, compression=0.9, method="hpr", tokens=1e9).loss == 3.387
    assert cell(p, compression=0.5, variant="dataset alignment", method="pc", tokens=6e9).loss == 2.6216
    assert len(p) == 32 and p.loss.notna().all()


def test_paper_grid_shows_the_papers_numbers_beside_ours(tmp_path: Path):
    root = tmp_path / "results" / "paper_gpt2"
    for model, ratio, tokens in (("gpt2-800m", 80, 2.5e9), ("gpt2-300m", 80, 1.25e9)):
        base = f"base-{model}-{ratio}"
        _run(root, base, "base", {"model": model, "ratio": ratio},
             {"compress": None, "model": {"name": model}, "train": {"tokens": 1}}, "completed",
             _final("pretrain", 3.0, 1000, 10))
        comp = 0.5 if model == "gpt2-800m" else 0.35
        for method, loss in (("hpr", 2.99), ("pc", 2.98)):
            _run(root, f"c-{model}-{method}", "compress", {"model": model, "ratio": ratio, "method": method,
                                                           "compression": comp, "tokens": tokens},
                 {"compress": {"method": method, "compression": comp, "importance": "random"},
                  "model": {"path": f"run:{base}"}, "train": {"tokens": int(tokens)}}, "completed",
                 _final(method, loss, 1000, 5), deps=[base])
    out = build_report(tmp_path / "results", "paper_gpt2", tmp_path / "out")
    md = (out / "tables" / "table_compress.md").read_text()
    assert _row(md, "50%", "gpt2-800m", "80:1", "HPR (paper)")[5] == "lost (2.9733 T3)"
    assert _row(md, "50%", "gpt2-800m", "80:1", "PC (paper)")[5] == "**2.9652**"
    assert _row(md, "35%", "gpt2-300m", "80:1", "HPR (paper)")[4] == "**3.1759** (i)"
    assert _row(md, "35%", "gpt2-300m", "80:1", "PC (paper)")[4] == "lost"
    base = (out / "tables" / "base_models.md").read_text()
    assert "2.7234" in base and "3.0041" in base
    assert "The paper's numbers" in (out / "REPORT.md").read_text()
    t1 = (out / "tables" / "table1_compress.md").read_text()
    assert _row(t1, "50%", "gpt2-800m", "PC (paper)")[4] == "**2.9652**"
    ref = pd.read_csv(out / "tables" / "paper_reference.csv")
    assert len(ref) == 4 + 120 + 8 + 32


def test_llama_grid_matches_the_poster_including_dataset_alignment(tmp_path: Path):
    root = tmp_path / "results" / "paper_llama3_1b"
    _run(root, "align-0", "align", {}, {"compress": None, "model": {"name": "llama3.2-1b"}, "train": {"tokens": 1}},
         "completed", _final("pretrain", 2.5, 1000, 10))
    for method, loss in (("hpr", 3.30), ("pc", 3.20)):
        _run(root, f"compress-{method}", "compress", {"method": method, "compression": 0.9, "tokens": 1e9},
             {"compress": {"method": method, "compression": 0.9, "importance": "random"},
              "model": {"name": "llama3.2-1b"}, "train": {"tokens": 1000000000}}, "completed",
             _final(method, loss, 1000, 5))
        _run(root, f"aligned-{method}", "aligned", {"method": method, "tokens": 1e9},
             {"compress": {"method": method, "compression": 0.5, "importance": "random"},
              "model": {"name": "hf", "path": "run:align-0"}, "train": {"tokens": 1000000000}}, "completed",
             _final(method, loss - 0.5, 1000, 5), deps=["align-0"])
    out = build_report(tmp_path / "results", "paper_llama3_1b", tmp_path / "out")
    md = (out / "tables" / "table_compress.md").read_text()
    assert _row(md, "90%", "HPR (paper)")[2] == "3.3870" and _row(md, "90%", "PC (paper)")[2] == "**3.3155**"
    md = (out / "tables" / "table_aligned.md").read_text()
    assert _row(md, "50%", "HPR (paper)")[2] == "**2.7644**" and _row(md, "50%", "PC (paper)")[2] == "2.7656"


def test_cli_report_takes_a_grid_name_or_yaml(tmp_path: Path, capsys):
    from pcbench.cli import main

    make_store(tmp_path / "results")
    assert main(["report", GRID, "--results", str(tmp_path / "results"), "--out", str(tmp_path / "a")]) == 0
    yml = tmp_path / "g.yaml"
    yml.write_text(f"name: {GRID}\nresults_dir: {tmp_path / 'results'}\nstages: {{}}\n")
    assert main(["report", str(yml), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / GRID / "REPORT.md").read_bytes() == (tmp_path / "b" / GRID / "REPORT.md").read_bytes()
    assert main(["report", "nosuch", "--results", str(tmp_path / "results")]) == 2
    assert "no results for grid 'nosuch'" in capsys.readouterr().err


def test_a_table_or_figure_is_one_entry_in_contents(tmp_path: Path, monkeypatch):
    """A Part added to contents.PARTS reaches tables/ (md and csv) and REPORT.md at its place in the list;
    a Figure added to contents.FIGURES is drawn and linked."""
    import matplotlib.pyplot as plt

    from pcbench.report import contents, figures
    from pcbench.report.tables import Table

    def per_stage(inp):
        data = inp.study.runs.groupby("stage").size().reset_index(name="runs")
        return [Table("per_stage", "Runs per stage", "| stage | runs |\n", data)]

    def draw(inp, path, stage):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        return figures.save(fig, path)

    at = [p.name for p in contents.PARTS].index("cost") + 1
    monkeypatch.setattr(contents, "PARTS", contents.PARTS[:at] + [contents.Part("per_stage", per_stage,
                                                                               contents.titled())] + contents.PARTS[at:])
    monkeypatch.setattr(contents, "FIGURES", contents.FIGURES + [contents.Figure("line.png", "A line", draw)])
    make_store(tmp_path / "results")
    out = build_report(tmp_path / "results", GRID, tmp_path / "out")
    text = (out / "REPORT.md").read_text()
    assert text.index("## Cost per method") < text.index("## Runs per stage") < text.index("## Figures")
    assert (out / "tables" / "per_stage.csv").read_text().splitlines()[:2] == ["stage,runs", "base,2"]
    assert (out / "tables" / "per_stage.md").read_text().startswith("# Runs per stage")
    assert (out / "figures" / "line.png").is_file() and "- A line: [figures/line.png](figures/line.png)" in text


SLOW_IMPORTS = ("pandas", "numpy", "matplotlib", "torch", "transformers")


def _imported_after(code: str, *args: str) -> list:
    """The last stdout line (JSON) of `code` run in a fresh interpreter."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_report_says_it_started_before_its_slow_imports(tmp_path: Path):
    """The first progress line comes before pandas/matplotlib are imported; `--help` and a bad grid name
    import none of them (the CLI answers at once)."""
    make_store(tmp_path / "results")
    seen = _imported_after(
        "import json, sys\nfrom pcbench.report import build_report\nseen = []\n"
        f"build_report(sys.argv[1], {GRID!r}, sys.argv[2], progress=lambda m: seen.append("
        f"[m, [x for x in {SLOW_IMPORTS!r} if x in sys.modules]]))\nprint(json.dumps(seen))",
        str(tmp_path / "results"), str(tmp_path / "out"))
    assert seen[0][0].startswith(f"report of grid {GRID}: reading") and seen[0][1] == []
    assert "pandas" in seen[-1][1] and any(m.startswith("figure ") for m, _ in seen)
    for argv in (["report", "--help"], ["report", "nosuch", "--results", str(tmp_path / "results")]):
        heavy = _imported_after("import json, sys\nfrom pcbench.cli import main\ntry:\n    main(sys.argv[1:])\n"
                                f"except SystemExit:\n    pass\nprint(json.dumps([m for m in {SLOW_IMPORTS!r} "
                                "if m in sys.modules]))", *argv)
        assert heavy == [], (argv, heavy)


# -- what a person reads: chance levels, the bold rule, figure text, CLI tables ----------------------
BUDGETS = (400_000, 800_000, 1_600_000, 3_200_000, 6_400_000)   # the mini study's budgets
# tokens -> (HPR seeds, PC seeds): at 400k the means differ by 0.01 < their combined s.e. 0.0141; elsewhere by 0.1
SEEDED = {t: ((3.00, 3.02), (2.99, 3.01)) if t == 400_000 else ((2.90 - i / 10, 2.92 - i / 10), (2.80 - i / 10,
                                                                                                 2.82 - i / 10))
          for i, t in enumerate(BUDGETS)}
# tokens -> {method: pcb_continuation acc} (stderr 0.015 each: combined 0.0212) and pcb_cloze (0 vs 2 of 1000)
CONT = {400_000: {"hpr": 0.40, "pc": 0.41}, 6_400_000: {"hpr": 0.40, "pc": 0.50}}
CLOZE = {"hpr": 0.0, "pc": 0.002}


def make_sig_store(results: Path, grid: str = "sig") -> Path:
    """Two seeds per cell at the mini budgets, evals with lm-eval stderr (continuation) or sample counts only."""
    root = results / grid
    _run(root, "base-0", "base", {"ratio": 80}, {"compress": None, "model": {"name": "tiny"},
                                                "train": {"tokens": 8000, "seed": 0}}, "completed",
         _final("pretrain", 3.5, 8000, 100))
    for tokens, pair in SEEDED.items():
        for method, losses in zip(("hpr", "pc"), pair):
            for seed, loss in enumerate(losses):
                rid = f"compress-{method}-{tokens}-s{seed}"
                _run(root, rid, "compress", {"ratio": 80, "method": method, "compression": 0.5, "tokens": tokens,
                                             "seed": seed},
                     {"compress": {"method": method, "compression": 0.5, "importance": "random"},
                      "model": {"name": "hf", "path": "run:base-0"}, "train": {"tokens": tokens, "seed": seed}},
                     "completed", _final(method, loss, 1000, 50), deps=["base-0"])
                _wl(root / "runs" / rid / "metrics.jsonl", [{"step": s, "loss": loss + 1 / s, "loss_avg": loss + 1 / s,
                                                            "tokens": s * tokens / 10} for s in range(1, 11)])
    for tokens, cont in CONT.items():
        for method in ("hpr", "pc"):
            parent, rid = f"compress-{method}-{tokens}-s0", f"eval-{method}-{tokens}"
            _run(root, rid, "eval", {"ratio": 80, "method": method, "compression": 0.5, "tokens": tokens, "seed": 0},
                 {"model": f"run:{parent}", "tasks": ["pcb_cloze", "pcb_continuation"]}, "completed", kind="eval",
                 deps=[parent])
            tasks = {"pcb_cloze": {"acc": CLOZE[method]},
                     "pcb_continuation": {"acc": cont[method], "acc_stderr": 0.015}}
            _w(root / "runs" / rid / "eval.json", {
                "parent": parent, "average": (CLOZE[method] + cont[method]) / 2, "tasks": tasks,
                "primary": {"pcb_cloze": "acc", "pcb_continuation": "acc"},
                "samples": {"pcb_cloze": 1000, "pcb_continuation": 1000}})
    return root


def _overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of drawn tick labels (per axis, major and minor) whose bounding boxes overlap."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            shown = [t for minor in (False, True) for loc, t in zip(axis.get_ticklocs(minor=minor),
                                                                    axis.get_ticklabels(minor=minor))
                     if t.get_visible() and t.get_text() and lo <= loc <= hi]
            boxes = [(t.get_text(), t.get_window_extent(r)) for t in shown]
            out += [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]
    return out


def _inside(fig) -> list[str]:
    """Titles, axis labels and legend texts that stick out of the figure's width."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    texts += [t for ax in fig.axes if ax.axison for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    texts += [t for lg in fig.legends for t in lg.get_texts()]
    return [t.get_text() for t in texts if t.get_visible() and t.get_text() and not
            (fig.bbox.x0 - 1 <= t.get_window_extent(r).x0 and t.get_window_extent(r).x1 <= fig.bbox.x1 + 1)]


@pytest.fixture()
def drawn(monkeypatch) -> dict:
    """Every figure a report draws, inspected just before it is saved: name -> {texts, overlaps, outside, hlines}."""
    import matplotlib.text

    from pcbench.report import figures

    seen: dict = {}
    real = figures.save

    def spy(fig, path):
        seen[Path(path).name] = {
            "texts": [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()],
            "overlaps": _overlaps(fig), "outside": _inside(fig),
            "hlines": sorted({round(float(ln.get_ydata()[0]), 6) for ax in fig.axes for ln in ax.get_lines()
                              if list(np.asarray(ln.get_xdata(), float)) == [0.0, 1.0]}),  # axhline()s
            "xticks": [[t.get_text() for t in ax.get_xticklabels() if t.get_text()] for ax in fig.axes]}
        return real(fig, path)

    monkeypatch.setattr(figures, "save", spy)
    return seen


def test_chance_levels_in_one_table():
    from pcbench.report.chance import average_chance, chance

    assert chance("pcb_cloze") == 0.0 and chance("pcb_continuation") == 0.25
    assert chance("piqa") == chance("winogrande") == 0.5 and chance("social_iqa") == pytest.approx(1 / 3)
    assert chance("hellaswag") == chance("arc_easy") == chance("sciq") == 0.25 and chance("lambada_openai") == 0
    assert math.isnan(chance("a_task_we_do_not_know"))
    assert average_chance(["pcb_cloze", "pcb_continuation"]) == 0.125
    assert math.isnan(average_chance(["pcb_cloze", "unknown"])) and math.isnan(average_chance([]))


def test_bold_only_beyond_the_combined_standard_error(tmp_path: Path):
    make_sig_store(tmp_path / "results")
    out = build_report(tmp_path / "results", "sig", tmp_path / "out")
    md = (out / "tables" / "table_compress.md").read_text()
    hpr, pc = _row(md, "50%", "80:1", "HPR"), _row(md, "50%", "80:1", "PC")
    # 400k: 3.01 vs 3.00, s.e. 0.01 each -> 0.01 < 0.0141: no mark; 800k: 2.81 vs 2.71 -> PC bold
    assert "**" not in hpr[3] and "**" not in pc[3] and pc[3].startswith("3.0000 ±")
    assert pc[4].startswith("**2.7100**") and "**" not in hpr[4]
    assert "only where the difference exceeds the pair's combined standard error" in md
    csv = pd.read_csv(out / "tables" / "table_compress.csv")
    c = csv[csv.tokens == 400_000].set_index("method")
    assert c.loc["pc", "se"] == pytest.approx(0.01) and not c.better.any()

    down = (out / "tables" / "downstream_tasks_compress.md").read_text()
    cont_h, cont_p = (_row(down, "50%", "80:1", "pcb_continuation", "0.25", m) for m in ("HPR", "PC"))
    # 400k: 0.40 vs 0.41 (combined s.e. 0.0212): no winner; 6.4M: 0.40 vs 0.50: PC; both far above chance
    assert cont_h[5] == "0.4000 ± 0.0150" and cont_p[5] == "0.4100 ± 0.0150"
    assert cont_p[6] == "**0.5000** ± 0.0150" and cont_h[6] == "0.4000 ± 0.0150"
    # cloze: 0 vs 2 of 1000 (binomial s.e. 0.0014 from the sample count): both at chance, so no winner
    cl_h, cl_p = (_row(down, "50%", "80:1", "pcb_cloze", "0", m) for m in ("HPR", "PC"))
    assert cl_h[5] == "0.0000 ± 0.0000 †" and cl_p[5] == f"0.0020 ± {math.sqrt(0.002 * 0.998 / 1000):.4f} †"
    assert "Chance level: pcb_cloze 0, pcb_continuation 0.25; of the average 0.1250" in down
    avg = (out / "tables" / "downstream_compress.md").read_text()
    a_h, a_p = _row(avg, "50%", "80:1", "HPR"), _row(avg, "50%", "80:1", "PC")
    se_p = math.sqrt(0.015 ** 2 + 0.002 * 0.998 / 1000) / 2
    assert a_p[4] == f"**0.2510** ± {se_p:.4f}" and a_h[4].startswith("0.2000 ±")   # average well above 0.125
    assert "†" not in a_p[4] and "†:" in avg


def test_figures_ticks_titles_and_words(tmp_path: Path, drawn: dict):
    make_store(tmp_path / "results")
    build_report(tmp_path / "results", GRID, tmp_path / "out")
    assert {"loss_vs_tokens_compress.png", "gap_vs_tokens.png", "gap_vs_ratio.png", "downstream.png",
            "recovery.png", "curves.png"} <= set(drawn)
    for name, fig in drawn.items():
        assert not fig["overlaps"], (name, fig["overlaps"])
        assert not fig["outside"], (name, fig["outside"])
        text = " ".join(fig["texts"])
        assert "parent_stage" not in text and "importance importance" not in text and "base_ratio" not in text
        assert "x: " not in text, name                    # no paper markers in these grids, so none promised
    loss = drawn["loss_vs_tokens_compress.png"]
    assert loss["xticks"][0] == ["1k", "2k", "4k", "8k"]   # a tick per budget, as the tables name them
    assert "20:1 base" in loss["texts"] and "80:1 base" in loss["texts"]
    assert drawn["downstream.png"]["hlines"] == []          # tasks "a", "b": no known chance level, none drawn


def test_token_ticks_at_the_budgets_thinned_when_close():
    from pcbench.report import fmt
    from pcbench.report.figures import token_ticks

    ticks, (lo, hi) = token_ticks(BUDGETS)
    assert ticks == list(map(float, BUDGETS)) and lo < 400_000 and hi > 6_400_000
    assert [fmt.tokens(t) for t in ticks] == ["400k", "800k", "1.6M", "3.2M", "6.4M"]
    ticks, _ = token_ticks([1e6, 1.1e6, 1.2e6, 1e9])
    assert ticks[-1] == 1e9 and len(ticks) < 4
    assert token_ticks([40960])[0] == [40960.0]


def test_figure_tick_labels_never_overlap_on_the_mini_budgets(tmp_path: Path, drawn: dict):
    make_sig_store(tmp_path / "results")
    build_report(tmp_path / "results", "sig", tmp_path / "out")
    for name in ("loss_vs_tokens_compress.png", "gap_vs_tokens.png"):
        assert drawn[name]["xticks"][0] == ["400k", "800k", "1.6M", "3.2M", "6.4M"], name
        assert not drawn[name]["overlaps"]
    assert 0.125 in drawn["downstream.png"]["hlines"]         # the average's chance level, drawn


def test_status_values_are_formatted_for_people():
    from pcbench.report import fmt

    rows = [{"run": "base-1", "ratio": 20, "state": "completed", "loss": 3.5, "heldout": 3.71234},
            {"run": "compress-2", "ratio": 80, "state": "running", "method": "pc", "compression": 0.35,
             "tokens": 1.25e9, "seed": 0.0, "loss": math.nan},
            {"run": "eval-3", "state": "completed", "tokens": 400_000.0, "seed": 1.0, "score": 0.11}]
    text = fmt.text_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["run", "ratio", "state", "loss", "heldout", "method", "compression", "tokens", "seed",
                                "score"]
    assert lines[1].split() == ["base-1", "20:1", "completed", "3.5000", "3.7123", "-", "-", "-", "-", "-"]
    assert lines[2].split() == ["compress-2", "80:1", "running", "-", "-", "PC", "35%", "1.25B", "0", "-"]
    assert lines[3].split() == ["eval-3", "-", "completed", "-", "-", "-", "-", "400k", "1", "0.1100"]
    assert "NaN" not in text and "nan" not in text and "e+" not in text and "0.0 " not in text


def test_cli_status_and_dry_run_tables(capsys):
    from pcbench.cli import main

    root = Path(__file__).resolve().parents[1]
    assert main(["status", str(root / "experiments" / "default.yaml"), "--results", str(root / "results")]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and "e+0" not in out and "completed" in out
    first = next(line for line in out.splitlines() if line.strip().startswith("compress-"))
    assert "HPR" in first and "%" in first and re.search(r" \d\.\d{4} ", first)
    assert main(["run", str(root / "experiments" / "default.yaml"), "--results", str(root / "results"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if " action " in line)
    assert header.split()[0] == "run" and re.search(r"^\s*compress-[0-9a-f]{10} ", out, re.M)
    assert "NaN" not in out and "e+0" not in out


def test_table_csvs_do_not_carry_a_fits_last_bits():
    """Two builds of a float that differ in their last bits (a BLAS build or CPU apart: the scaling
    report's claims.csv did) write the same CSV; integral floats stay floats, text and ints as they were."""
    import pandas as pd

    from pcbench.report import csv_text

    a = pd.DataFrame({"slope": [-0.0006790084392366268, 1150080.0], "n": [3, 4], "what": ["x", 0.1 + 0.2]})
    b = pd.DataFrame({"slope": [-0.0006790084392366306, 1150080.0], "n": [3, 4], "what": ["x", 0.30000000000000004]})
    assert a.to_csv(index=False) != b.to_csv(index=False)
    assert csv_text(a) == csv_text(b)
    assert csv_text(a).splitlines()[1:] == ["-0.000679008439237,3,x", "1150080.0,4,0.3"]
