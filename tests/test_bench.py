"""The benchmarks run, write complete JSON (+PNG) and time real training steps. No assertion on
speed: speed is measured by the benchmarks, never asserted in tests."""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import pytest
import torch

from pcbench.bench import step_cost, throughput
from pcbench.bench.machine import machine_info
from pcbench.compress.projected import Projected

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "llama-tiny", "--vocab", "97", "--seq", "16", "--threads", "1", "--device", "cpu"]


def _one(tmp, pattern: str) -> dict:
    files = sorted(tmp.glob("*.json"))
    assert len(files) == 1 and re.fullmatch(pattern, files[0].name), files
    return json.loads(files[0].read_text())


def _machine_ok(m: dict) -> None:
    for key in ("hostname", "date", "cpu_model", "logical_cores", "physical_cores", "torch", "torch_threads",
                "cuda_device", "load_before", "load_after", "git", "other_processes_busy_cores_during"):
        assert key in m, key
    assert m["logical_cores"] >= 1 and m["torch_threads"] == 1
    assert len(m["load_before"]) == 3 and len(m["load_after"]) == 3
    assert re.fullmatch(r"[0-9a-f]{40}", m["git"]["commit"])


def _timing_ok(s: dict, n: int) -> None:
    assert s["n"] == n == len(s["repeats"]) and all(t > 0 for t in s["repeats"])
    assert s["median"] == statistics.median(s["repeats"]) and s["min"] == min(s["repeats"])


def test_throughput_writes_json_and_trains(tmp_path, capsys):
    assert throughput.main(TINY + ["--batch", "4", "--steps", "3", "--warmup", "1", "--out", str(tmp_path)]) == 0
    assert "ours/plain" in capsys.readouterr().out
    rec = _one(tmp_path, r"throughput-.+-\d{8}-\d{6}\.json")
    _machine_ok(rec["machine"])
    assert rec["config"]["tokens_per_step"] == 64 and rec["config"]["repeats"] == 3
    m, d = rec["measurements"], rec["derived"]
    for loop in ("ours", "plain"):
        _timing_ok(m[loop]["seconds_per_repeat"], 3)
        assert m[loop]["tokens_per_s"]["median"] > 0
        losses = m[loop]["losses"]
        assert len(losses) == 4 and losses[-1] < losses[0]  # real steps: a fixed batch is being learnt
        assert len(m[loop]["others_busy_cores"]) == 3
    # Same initial weights and batch: both loops see the same first loss.
    assert m["ours"]["losses"][0] == pytest.approx(m["plain"]["losses"][0], rel=1e-6)
    assert d["ours_over_plain_tokens_per_s"] == pytest.approx(
        m["ours"]["tokens_per_s"]["median"] / m["plain"]["tokens_per_s"]["median"])
    assert d["ours_over_plain_seconds"] == pytest.approx(
        m["ours"]["seconds_per_repeat"]["median"] / m["plain"]["seconds_per_repeat"]["median"])
    assert "mfu" not in d  # CPU: no peak table


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_step_cost_writes_json_png_and_trains(tmp_path, capsys):
    argv = TINY + ["--cells", "2x2", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)]
    assert step_cost.main(argv) == 0
    assert "PC/HPR at the largest" in capsys.readouterr().out
    rec = _one(tmp_path, r"step-cost-.+-\d{8}-\d{6}\.json")
    png = tmp_path / rec["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _machine_ok(rec["machine"])
    assert "memory_method" in rec["config"] and rec["config"]["plan"]["widths"]
    (cell,) = rec["cells"]
    assert cell["cell"] == {"micro_batches": 2, "rows": 2, "label": "64 (2x2)", "tokens": 64}
    m, r, f = cell["measurements"], cell["ratios"], cell["flops"]
    med = {k: m[k]["step_seconds"]["median"] for k in step_cost.METHODS}
    for k in step_cost.METHODS:
        _timing_ok(m[k]["step_seconds"], 2)
        losses = m[k]["losses"]
        assert len(losses) == 3 and losses[-1] < losses[0], (k, losses)
        assert len(m[k]["others_busy_cores"]) == 2
        mem = cell["memory"][k]
        assert mem["persistent_mib"] > 0 and mem["step_peak_mib"] >= 0 and mem["peak_reset_after_build"]
    # PC at step 0 is HPR; naive PC follows the cost-free trajectory (same gradients).
    assert m["pc"]["losses"][0] == pytest.approx(m["hpr"]["losses"][0], rel=1e-6)
    assert m["naive"]["losses"] == pytest.approx(m["pc"]["losses"], rel=1e-4)
    assert r["pc_over_hpr"] == pytest.approx(med["pc"] / med["hpr"])
    assert r["naive_over_pc"] == pytest.approx(med["naive"] / med["pc"])
    base, plan = step_cost.build_base("llama-tiny", 97, 16, 0.5, seed=0)
    pc = Projected(base, plan, sides="both", residual=True)
    assert f["materialise_once"] == sum(t.flops() for t in pc.tensors.values())
    assert f["tokens_x_per_token"] == f["per_token"] * 64 and f["pc_fixed_per_step"] == pc.fixed_flops_per_step()
    assert f["materialise_once"] < f["pc_fixed_per_step"] < 4 * f["materialise_once"]  # below the old path
    assert r["pc_over_hpr_predicted"] == pytest.approx(1 + f["pc_fixed_per_step"] / f["tokens_x_per_token"])
    # The fixed part, measured inside every timed PC step: materialise + push, shorter than the step.
    fixed, mat, push = (m["pc"][k] for k in ("fixed_seconds", "materialise_seconds", "push_seconds"))
    for s in (fixed, mat, push):
        _timing_ok(s, 2)
        assert 0 < s["median_ci95"][0] <= s["median"] <= s["median_ci95"][1]
    assert fixed["repeats"] == pytest.approx([a + b for a, b in zip(mat["repeats"], push["repeats"])])
    assert all(a < b for a, b in zip(fixed["repeats"], m["pc"]["step_seconds"]["repeats"]))
    for k in step_cost.METHODS:
        _timing_ok(m[k]["optimiser_seconds"], 2)
    assert r["pc_over_hpr_fixed"] == pytest.approx(1 + fixed["median"] / med["hpr"])
    for key in ("pc_over_hpr", "pc_over_hpr_fixed"):
        lo, hi = r[key + "_ci95"]
        assert 0 < lo <= hi
    assert cell["seconds"]["pc_fixed_measured"] == fixed["median"] and cell["pc_step_cache_mib"] > 0


def test_bootstrap_interval_covers_and_narrows():
    wide = step_cost.bootstrap_ci(statistics.median, [1.0, 2.0, 3.0, 10.0, 2.5])
    assert 1.0 <= wide[0] < 2.5 < wide[1] <= 10.0
    assert step_cost.bootstrap_ci(step_cost.ratio_of_medians, [2.0] * 20, [1.0] * 20) == [2.0, 2.0]
    g = torch.Generator().manual_seed(0)
    few, many = (1 + 0.1 * torch.randn(n, generator=g) for n in (8, 400))
    lo8, hi8 = step_cost.bootstrap_ci(statistics.median, few.tolist())
    lo400, hi400 = step_cost.bootstrap_ci(statistics.median, many.tolist())
    assert hi400 - lo400 < hi8 - lo8 and lo400 < 1.0 < hi400


@pytest.mark.parametrize("method", step_cost.METHODS)
def test_benchmarked_steps_update_the_trained_parameters(method):
    base, plan = step_cost.build_base("llama-tiny", 97, 16, 0.5, seed=0)
    trainable, stepper = step_cost.build_method(method, base, plan, torch.device("cpu"), 1e-3, 4, micro=2)
    params = dict(trainable.named_parameters())
    trained = {n for g in trainable.param_groups(0.0) for p in g["params"] for n, q in params.items() if q is p}
    before = {n: params[n].detach().clone() for n in trained}
    batch = step_cost.fixed_batch(4, 16, 97, 0, torch.device("cpu"))
    losses = [stepper(batch, i)[0] for i in range(3)]
    assert losses[-1] < losses[0]
    changed = {n for n in trained if not torch.equal(before[n], params[n])}
    assert changed == trained  # every optimised tensor moved (P, R and norms for PC)
    if method != "hpr":
        assert any(n.startswith("tensors.") and n.endswith("p_out") for n in changed)


def test_machine_info_fields():
    m = machine_info()
    assert m["hostname"] and m["logical_cores"] >= 1 and m["torch"] == torch.__version__


@pytest.mark.parametrize("argv,field", [
    (["step-cost", "--cells", "1y8"], "--cells"), (["step-cost", "--cells", "0x8"], "--cells"),
    (["step-cost", "--cells", ","], "--cells"), (["memory", "--cells", "hpr-1-ddp"], "--cells"),
    (["memory", "--cells", "pc:0:fsdp"], "--cells"), (["memory", "--cells", "pcx:1:ddp"], "--cells"),
    (["memory", "--sizes", "huge"], "--sizes"),
])
def test_bad_bench_arguments_are_one_line_before_any_work(argv, field, tmp_path, capsys):
    from pcbench import cli

    assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"pcbench: error: {field}: ") and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_cpu_snapshots_count_descendants_a_pool_started(tmp_path):
    """Workers a pool or fork server started (grandchildren, waited by their own parent) are this
    benchmark's CPU, not "other processes" (a busy-looping grandchild counted while it runs). The
    grandchild spins for CPU seconds, not wall seconds, so a loaded machine gives the same count."""
    import subprocess
    import sys
    import time

    from pcbench.bench import machine

    started, spun = tmp_path / "started", tmp_path / "spun"
    spin = (f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\nt = time.process_time()\n"
            f"while time.process_time() - t < 1.5: pass\npathlib.Path({str(spun)!r}).touch()\ntime.sleep(1)")
    outer = subprocess.Popen([sys.executable, "-c",
                              f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"])

    def wait_for(p):
        deadline = time.time() + 120
        while not p.exists():
            assert time.time() < deadline and outer.poll() is None, f"{p.name} never came"
            time.sleep(0.02)

    try:
        wait_for(started)
        a = machine.cpu_snapshot()
        wait_for(spun)
        b = machine.cpu_snapshot()
    finally:
        outer.wait()
    assert b["own"] - a["own"] > 0.6  # the grandchild's busy 1.5 CPU seconds, seen as ours
    assert machine.steal_cores(a, b) is not None and machine.steal_cores(a, b) >= 0


@pytest.mark.slow
def test_bench_data_writes_rates_paired_ratios_and_the_sampler(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "pcbench.cli", "bench", "data", "--mb", "1", "--files", "2",
                        "--tokenizers", "gpt2", "--workers", "1,2", "--sizes", "10M", "--repeats", "2",
                        "--out", str(out)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    js = list(out.glob("data-*.json"))
    assert len(js) == 1 and js[0].with_suffix(".png").is_file()
    rec = json.loads(js[0].read_text())
    g = rec["rates"]["gpt2"]
    assert g["today"]["tokens"] == g["workers_1"]["tokens"] == g["workers_2"]["tokens"] > 0
    assert len(g["speedup_2_over_1_each_round"]) == 2 and g["speedup_2_over_1_paired_median"] > 0
    assert rec["sampler"]["10M"]["seconds_to_first_batch"] < 5
    assert set(rec["grids"]) >= {"paper_gpt2", "paper_llama3_1b"}
