"""The memory plan (`pcbench.train.memory`): the breakdown of a hand-computed config, the activation
coefficients against saved-tensor hooks, ddp vs fsdp scaling, the refusal before submission and
the dry-run column. Plan-vs-measured peaks are the benchmark's (`pcbench bench memory`)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pcbench.train import memory

from pcbench import models
from pcbench.spec.config import ModelSpec, load_run_spec

ROOT = Path(__file__).resolve().parents[1]

# llama-tiny: 2 layers, d 64, 4 heads of 16 (q width 64), 2 KV heads (kv width 32), d_ff 192; bpe-512.
D, F, HQ, HKV, HEADS, L, V = 64, 192, 64, 32, 4, 2, 512
MATRICES = {  # per layer: name -> (out, in)
    "q": (HQ, D), "k": (HKV, D), "v": (HKV, D), "o": (D, HQ), "gate": (F, D), "up": (F, D), "down": (D, F)}
PARAMS = 2 * V * D + L * (sum(a * b for a, b in MATRICES.values()) + 2 * D) + D  # untied head, norms


def tiny_spec(tmp_path: Path, method=None, **train) -> "object":
    d = {"model": {"name": "llama-tiny"}, "data": {"tokenizer": "bpe-512", "seq_len": 32},
         "train": {"steps": 2, "batch_size": 8, "micro_batch_size": 2, "device": "cpu", **train}}
    if method:
        cfg = tmp_path / "base"
        models.build_config(ModelSpec(name="llama-tiny"), V, 32).save_pretrained(cfg)
        d["model"] = {"name": "hf", "path": str(cfg)}
        d["compress"] = {"method": method, "compression": 0.5}
    return load_run_spec(d)


def test_breakdown_of_a_hand_computed_config(tmp_path):
    p = memory.plan(tiny_spec(tmp_path), world=2)  # 8 rows over 2 processes: 4 rows, micro-batch 2
    assert PARAMS == 164160
    c = p.components
    assert c["network"] == c["network_gradients"] == c["ddp_buckets"] == 4 * PARAMS
    assert c["optimizer"] == 8 * PARAMS
    tokens = 2 * 32
    per_token_layer = 24 * D + 16 * F + 8 * HQ + 8 * HKV + 4 * HEADS + 8  # fp32, SwiGLU
    assert per_token_layer == 5400  # what saved-tensor hooks count on this model (test below)
    assert c["activations"] == tokens * (L * per_token_layer + 12 * D + 12)
    assert c["logits"] == tokens * V * 16
    assert c["optimizer_transient"] == 2 * 4 * V * D  # CPU AdamW: two temporaries of the largest tensor
    assert p.phases["forward_backward"] == 4 * 4 * PARAMS + 4 * PARAMS + c["activations"] + c["logits"]
    assert p.peak == max(p.phases.values()) and p.peak_phase == "forward_backward"
    assert (p.micro_batch, p.accumulation, p.precision) == (2, 2, "fp32")


def test_projections_of_a_hand_computed_pc_plan(tmp_path):
    spec = tiny_spec(tmp_path, "pc")
    p = memory.plan(spec, world=1)
    w = memory.widths(memory.model_config(spec), 0.5)
    dc, fc = w["d_model"], w["d_ff"]
    assert dc < D and fc < F
    small_out = {"q": HQ, "k": HKV, "v": HKV, "o": dc, "gate": fc, "up": fc, "down": dc}
    small_in = {"q": dc, "k": dc, "v": dc, "o": HQ, "gate": dc, "up": dc, "down": fc}
    pr = 0
    for name, (n_out, n_in) in MATRICES.items():
        k_out, k_in = small_out[name], small_in[name]
        pr += (k_out * n_out if k_out != n_out else 0) + (n_in * k_in if k_in != n_in else 0) + k_out * k_in
    pr = L * pr + 2 * (D * dc + V * dc)  # embedding and head: P_in [d, d_c] and R [V, d_c]
    base = L * sum(a * b for a, b in MATRICES.values()) + 2 * V * D
    small = 2 * V * dc + L * (HQ * dc * 2 + HKV * dc * 2 + 3 * dc * fc + 2 * dc) + dc
    c = p.components
    assert c["projections"] == c["projection_gradients"] == 4 * pr
    assert c["frozen_base"] == 4 * base
    assert c["network"] == 4 * small
    direct = 2 * L * dc + dc  # norms: trained directly, stepped by AdamW with P and R
    assert c["optimizer"] == 8 * (pr + direct)
    bf16 = memory.plan(load_run_spec({**_spec_dict(spec), "compress": {"method": "pc", "compression": 0.5,
                                                                       "base_dtype": "bfloat16"}}))
    assert bf16.components["frozen_base"] == 2 * base


def _spec_dict(spec) -> dict:
    from pcbench.spec.config import to_dict

    return {k: v for k, v in to_dict(spec).items() if v is not None}


def _saved_bytes(preset: str, bf16: bool, tokens_rows: int, seq: int = 32) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    model = models.build_model(models.build_config(ModelSpec(name=preset), V, seq))
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, V, (tokens_rows, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for k, n in seen.items() if k not in params)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_coefficients_match_saved_tensors(preset, precision):
    seq = 32
    cfg = models.build_config(ModelSpec(name=preset), V, seq).to_dict()
    measured = {rows: _saved_bytes(preset, precision == "bf16", rows, seq) for rows in (2, 4)}
    per_token = (measured[4] - measured[2]) / (2 * seq)
    a = memory.activation_bytes(cfg, 1, precision)
    assert per_token == a["layers"] + a["outside"]
    # what does not grow with tokens: RoPE tables, and under autocast the bf16 weight copies
    fixed = measured[2] - 2 * seq * per_token
    mats = sum(p.numel() for n, p in models.build_model(models.build_config(ModelSpec(name=preset), V, seq))
               .named_parameters() if p.ndim == 2 and "embed" not in n)
    assert fixed == 2 * seq * (cfg.get("head_dim") or 16) * 4 + (2 * mats if precision == "bf16" else 0)


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    cfg = models.build_config(ModelSpec(name="llama-tiny"), V, 32).to_dict()
    full = memory.activation_bytes(cfg, 100, "fp32")
    ck = memory.activation_bytes(cfg, 100, "fp32", checkpointing=True)
    assert full["layers"] == L * full["per_layer"]
    assert ck["layers"] == L * 100 * D * 4 + full["per_layer"] < full["layers"]


def test_fsdp_divides_what_it_shards_and_ddp_replicates(tmp_path):
    spec = tiny_spec(tmp_path, "pc", batch_size=16, micro_batch_size=2)
    sharded = ("network", "projections", "frozen_base", "optimizer", "projection_gradients")
    one = memory.plan(spec, 1, parallel="fsdp")
    for world in (2, 4, 8):
        f = memory.plan(spec, world, parallel="fsdp")
        d = memory.plan(spec, world, parallel="ddp")
        for k in sharded:
            assert one.components[k] / world <= f.components[k] <= one.components[k] / world * 1.25, (k, world)
            assert d.components[k] == one.components[k]
        assert f.components["activations"] == d.components["activations"] == one.components["activations"]
        assert f.components["fsdp_gathered"] > 0 and "ddp_buckets" not in f.components
        assert d.components["ddp_buckets"] == one.components["network"]
        assert f.persistent < d.persistent
    assert memory.plan(spec, 8, parallel="fsdp").peak < memory.plan(spec, 2, parallel="fsdp").peak
    # with gradient accumulation FSDP2 keeps the network's gradients unsharded
    acc = memory.plan(spec, 4, parallel="fsdp")
    assert acc.accumulation == 2 and acc.components["network_gradients"] == one.components["network"]
    no_acc = memory.plan(spec, 4, parallel="fsdp", micro_batch=4)
    assert no_acc.accumulation == 1 and no_acc.components["network_gradients"] < one.components["network"]


def test_blockwise_stepping_plans_one_block_of_gradients(tmp_path):
    spec = tiny_spec(tmp_path, "pc")
    whole = memory.plan(spec, 1)
    block = memory.plan(spec, 1, blockwise=True)
    assert block.blockwise and "push" not in block.phases
    assert block.components["block_gradients_and_step"] < whole.components["projection_gradients"]
    assert max(block.phases["blockwise_step"], block.phases["forward_backward"]) == block.peak
    assert block.peak <= whole.peak


def test_shape_only_presets_plan_without_weights():
    spec = load_run_spec({"model": {"name": "llama3.1-8b"}, "data": {"tokenizer": "model", "seq_len": 1024},
                          "train": {"tokens": 10 ** 9, "batch_size": 512, "micro_batch_size": 2, "device": "cuda",
                                    "parallel": "fsdp", "activation_checkpointing": True},
                          "compress": {"method": "pc", "compression": 0.5, "align": 64, "base_dtype": "bfloat16"}})
    cfg = memory.model_config(spec)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == \
        (32, 4096, 14336, 128256)
    assert not cfg["tie_word_embeddings"]
    p = memory.plan(spec, 8)
    base = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336) + 2 * 128256 * 4096
    assert p.components["frozen_base"] == pytest.approx(2 * base / 8, rel=1e-3)
    assert p.precision == "bf16" and p.fits(80) and not memory.plan(spec, 1, parallel="ddp").fits(80)


# ---------------------------------------------------------------------------------------------
# Through the CLI

GRID = {
    "name": "memtest",
    "resources": {"gpus_per_node": 1, "gpu_mem_gb": 20},
    "stages": {"pretrain": {
        "spec": {"model": {"name": "gpt2-300m"},
                 "data": {"tokenizer": "gpt2", "seq_len": 512},
                 "train": {"steps": 10, "batch_size": 64, "micro_batch_size": 32, "device": "cuda"}}}},
}


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pcbench.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("memgrid") / "grid.yaml"
    p.write_text(yaml.safe_dump(GRID))
    return p


def test_refusal_names_the_numbers_and_what_fits(grid_file):
    from pcbench.grid import load_grid

    # 21 GB: activation checkpointing alone needs 19.9 GB, more than a "20 GB" card's usable 19.8
    grid = load_grid(grid_file)
    run = grid.runs[0]
    msg = memory.refusal(run.id, run.spec, 1, 1, 21)
    assert msg is not None and "\n" not in msg
    p = memory.plan(run.spec, 1, device="cuda")
    assert f"needs {p.needs() / memory.GiB:.1f} GB" in msg and "the 21 GB asked" in msg
    alts = memory.alternatives(run.spec, 1, 1, 21)
    assert {a.parallel for a in alts} == {"ddp", "fsdp"} and any(a.activation_checkpointing for a in alts)
    assert any(a.parallel == "ddp" and a.micro_batch < p.micro_batch for a in alts)
    for a in alts:  # every alternative named fits, by the same planner
        assert a.fits(21) and f"{a.setting()} ({a.needs() / memory.GiB:.1f} GB)" in msg, msg
    fsdp = next(a for a in alts if a.parallel == "fsdp")
    assert not memory.plan(run.spec, fsdp.world // 2, device="cuda", parallel="fsdp").fits(21)
    assert memory.refusal(run.id, run.spec, 1, 1, 200) is None


def test_cli_refuses_before_submitting(grid_file, tmp_path):
    res = tmp_path / "results"
    r = _cli(["run", str(grid_file), "--results", str(res), "--work", str(tmp_path / "work")])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1 and lines[0].startswith("pcbench: error: resources.gpu_mem_gb:"), r.stderr
    assert "Traceback" not in r.stderr and "would fit:" in lines[0]
    assert not list(res.glob("**/status.json")) and not list(res.glob("**/final.json"))
    # --gpu-mem overrides the grid's figure: enough memory, so the dry run shows no refusal
    ok = _cli(["run", str(grid_file), "--results", str(res), "--dry-run", "--gpu-mem", "200"])
    assert ok.returncode == 0, ok.stderr
    assert "refused on submission" not in ok.stdout


def test_dry_run_shows_gb_per_gpu(grid_file, tmp_path):
    from pcbench.grid import load_grid

    r = _cli(["run", str(grid_file), "--results", str(tmp_path / "results"), "--dry-run"])
    assert r.returncode == 0, r.stderr
    header = next(ln for ln in r.stdout.splitlines() if ln.lstrip().startswith("run"))
    assert "GB/GPU" in header
    run = load_grid(grid_file).runs[0]
    gb = memory.plan(run.spec, 1, device="cuda").gb
    assert f"{gb:.1f}" in next(ln for ln in r.stdout.splitlines() if run.id in ln)
    assert "over the GPU memory asked, refused on submission: " + run.id in r.stdout


def test_the_8b_grid_fits_80gb_gpus():
    from pcbench.grid import load_grid

    grid = load_grid(ROOT / "experiments" / "paper_llama3_8b.yaml")
    resolve = memory.grid_resolver(grid)
    train = [r for r in grid.runs if r.kind == "train"]
    assert train
    for run in train:
        assert run.resources.gpus_per_node == 8 and run.spec.train.parallel == "fsdp"
        p = memory.run_plan(run, run.resources, resolve)
        assert p is not None and p.world == 8 and p.fits(80), (run.id, p.gb)
    assert memory.over_limit(train, lambda r: r.resources, resolve) == []


@pytest.mark.parametrize("name", ["paper_gpt2", "paper_llama3_1b", "paper_llama3_8b"])
def test_no_paper_cell_is_planned_within_10_percent_of_its_card_without_fsdp_or_checkpointing(name):
    """A cell whose plan (peak plus reserve) comes within 10% of its card's usable memory runs under
    fsdp or activation checkpointing, so an error of the plan cannot run it out of memory."""
    from pcbench.grid import load_grid

    grid = load_grid(ROOT / "experiments" / f"{name}.yaml")
    resolve = memory.grid_resolver(grid)
    train = [r for r in grid.runs if r.kind == "train"]
    assert train
    for run in train:
        p = memory.run_plan(run, run.resources, resolve)
        assert p is not None, run.id
        share = p.needs() / memory.usable_bytes(run.resources.gpu_mem_gb)
        assert share <= 0.9 or p.parallel == "fsdp" or p.activation_checkpointing, (run.id, p.setting(), share)


@pytest.mark.parametrize("name", ["paper_gpt2", "paper_llama3_1b", "paper_llama3_8b"])
def test_pc_on_several_gpus_runs_its_fixed_part_on_each_ranks_rows(name):
    """Under ddp every rank would materialise every W_c and push into all of P/R (the fixed part
    repeated world times); the paper grids run PC cells on more than one GPU under fsdp, where each
    rank does its rows only, and the plan shares what fsdp shards."""
    from pcbench.grid import load_grid

    grid = load_grid(ROOT / "experiments" / f"{name}.yaml")
    resolve = memory.grid_resolver(grid)
    pc = [r for r in grid.runs if r.kind == "train" and r.spec.compress and r.spec.compress.method == "pc"]
    assert pc
    for run in pc:
        p = memory.run_plan(run, run.resources, resolve)
        if p.world > 1:
            assert p.parallel == "fsdp", (run.id, p.setting())
            ddp = memory.plan(run.spec, p.world, resolve=resolve, device="cuda", parallel="ddp")
            assert p.peak < ddp.peak, (run.id, p.peak, ddp.peak)


def test_run_record_holds_the_plan_beside_the_measured_peak(tmp_path):
    from pcbench.train.loop import RunPaths, train

    spec = load_run_spec({"model": {"name": "gpt2-nano"},
                          "data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32, "eval_batches": 1},
                          "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "log_every": 1,
                                    "ckpt_every": 0, "threads": 1, "device": "cpu"}})
    rec = train(spec, RunPaths(record=tmp_path / "record", work=tmp_path / "work"), progress=False)
    plan = rec["memory_plan"]
    assert "error" not in plan, plan
    assert plan["peak_bytes"] == memory.plan(spec, 1, device="cpu").peak > 0
    assert plan["world_size"] == 1 and plan["parallel"] == "ddp"
    assert rec["peak_memory_bytes"] > plan["peak_bytes"]  # CPU: the process's whole peak RSS
    assert "RSS" in rec["peak_memory_method"]


def _kept_storages(run, extra=lambda: ()) -> dict[int, int]:
    """{storage: bytes} autograd saves in `run()` plus those of `extra()` after it (by data pointer)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    for t in extra():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return seen


@pytest.mark.parametrize("sides", ["both", "out", "in"])
def test_pc_naive_plans_what_its_micro_batches_keep(tmp_path, sides):
    """pc-naive keeps, per micro-batch, what autograd saves of every W_c's products and W_c itself:
    the plan's `step_cache` + `graph_weights` equal the bytes of those storages (saved-tensor hooks,
    beyond what the small network's own forward saves); its network gradients are the direct
    vectors' only, and it has no push phase."""
    from pcbench.spec import methods
    from pcbench.compress import importance
    from pcbench.compress.plan import make_plan

    torch.manual_seed(0)
    spec = load_run_spec({**_spec_dict(tiny_spec(tmp_path, "pc-naive")),
                          "compress": {"method": "pc-naive", "compression": 0.5, "sides": sides}})
    base = models.build_model(models.build_config(ModelSpec(name="llama-tiny"), V, 32))
    naive = methods.build("pc-naive", base, make_plan(base, 0.5, importance.random(base, 0)), spec, torch.device("cpu"))
    x = torch.randint(0, V, (spec.train.micro_batch_size, 32))
    owned = {t.untyped_storage().data_ptr() for t in [*naive.parameters(), *naive.buffers()]}
    kept = _kept_storages(lambda: naive.network(input_ids=x), lambda: naive._last.values())
    hpr = copy.deepcopy(naive.model).requires_grad_(True)  # the same small network, every weight trained
    small = _kept_storages(lambda: hpr(input_ids=x))
    own_hpr = {t.untyped_storage().data_ptr() for t in hpr.parameters()}
    measured = sum(n for k, n in kept.items() if k not in owned) - sum(n for k, n in small.items() if k not in own_hpr)
    p = memory.plan(spec)
    c = p.components
    assert c["step_cache"] + c["graph_weights"] == measured > 0
    direct = sum(q.numel() for n, q in naive.model.named_parameters() if q.requires_grad)
    assert c["network_gradients"] == 4 * direct < c["network"]
    assert "push" not in p.phases
    pc = memory.plan(load_run_spec({**_spec_dict(spec), "compress": {"method": "pc", "compression": 0.5, "sides": sides}}))
    assert p.phases["forward_backward"] > pc.phases["forward_backward"]


# ---------------------------------------------------------------------------------------------
# The CUDA step's memory (issue 25): logits freed before clip and AdamW, the tied head's autocast
# copy, the card's usable memory, expandable segments; plan vs measured with the logits counted.


def test_stepper_frees_the_last_micro_batchs_logits_before_clip_and_adamw(monkeypatch):
    import weakref

    from pcbench.bench import step_cost
    from pcbench.train import loop, parallel

    base, plan = step_cost.build_base("llama-tiny", 97, 16, 0.5, seed=0)
    trainable, stepper = step_cost.build_method("hpr", base, plan, torch.device("cpu"), 1e-3, 4, micro=2)
    refs = []
    trainable.model.lm_head.register_forward_hook(lambda m, i, out: refs.append(weakref.ref(out)))
    seen = {}
    real = parallel.update

    def update(*a, **kw):
        seen["alive"] = [r() is not None for r in refs]
        return real(*a, **kw)

    monkeypatch.setattr(loop.parallel, "update", update)
    stepper(step_cost.fixed_batch(4, 16, 97, 0, torch.device("cpu")), 0)
    assert seen["alive"] == [False, False]  # both micro-batches' logits are gone when the update starts


def test_the_tied_heads_autocast_copy_is_planned(tmp_path):
    cfg = models.build_config(ModelSpec(name="llama-tiny"), V, 32)
    spec_of = {}
    for tied in (False, True):
        cfg.tie_word_embeddings = tied
        cfg.save_pretrained(tmp_path / str(tied))
        spec_of[tied] = load_run_spec({"model": {"name": "hf", "path": str(tmp_path / str(tied))},
                                       "data": {"tokenizer": "bpe-512", "seq_len": 32},
                                       "train": {"steps": 1, "batch_size": 2, "device": "cuda"}})
    untied, tied = (memory.plan(spec_of[t], device="cuda").components["autocast_copies"] for t in (False, True))
    # untied: the head is its own matrix (its copy counted); tied: the embedding is the head, copied alike
    assert tied == untied == 2 * (L * sum(a * b for a, b in MATRICES.values()) + V * D)


def test_fits_compares_with_the_cards_usable_memory():
    p = memory.MemoryPlan(kind="hpr", world=1, parallel="ddp", device="cuda", precision="bf16", micro_batch=1,
                          accumulation=1, activation_checkpointing=False, blockwise=False, components={},
                          phases={"x": 0}, peak=0, peak_phase="x", persistent=0)
    p.peak = int((79.6 * memory.GiB - memory.RESERVE_BYTES) / (1 + memory.RESERVE_FRACTION))
    assert p.needs() < 80 * memory.GiB and not p.fits(80)  # 79.6 GiB: more than an 80 GB card's 79.2
    p.peak = int((79.1 * memory.GiB - memory.RESERVE_BYTES) / (1 + memory.RESERVE_FRACTION))
    assert p.fits(80)
    assert memory.usable_bytes(141) / memory.GiB == pytest.approx(139.6, abs=0.05)


def test_cuda_processes_get_expandable_segments_unless_set():
    from pcbench.train.distributed import ALLOC_CONF, configure_cuda_allocator

    env = {}
    assert configure_cuda_allocator("cuda:0", env) and env == {"PYTORCH_CUDA_ALLOC_CONF": ALLOC_CONF}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    assert not configure_cuda_allocator(torch.device("cuda", 1), mine)
    assert mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}  # the user's setting stays
    assert not configure_cuda_allocator("cuda", {"PYTORCH_ALLOC_CONF": "x"}.copy())
    cpu = {}
    assert not configure_cuda_allocator("cpu", cpu) and cpu == {}


def _plan_vs_measured(method: str, vocab: int) -> tuple[memory.MemoryPlan, int]:
    import tempfile

    from pcbench.bench import memory as bench

    cfg = {"method": method, "world": 1, "parallel": "ddp", "size": "gpt2-17m", "vocab": vocab, "seq": 128,
           "rows": 4, "micro": 2, "steps": 2, "compression": 0.5, "threads": 1, "device": "cpu"}
    with tempfile.TemporaryDirectory() as d:
        bench.write_config(cfg, Path(d))
        cfg["config_dir"] = d
        p = memory.plan(load_run_spec(bench.cell_spec(cfg, d)), 1, device="cpu")
        measured = max(r["peak"] for r in bench.measure(cfg))
    print(f"{method} vocab {vocab}: plan {p.peak / 2**20:.1f} MiB ({p.peak_phase}), measured "
          f"{measured / 2**20:.1f} MiB, error {100 * (p.peak - measured) / measured:+.1f}%, "
          f"logits {p.components['logits'] / 2**20:.1f} MiB")
    return p, measured


def test_plan_vs_measured_within_5_percent_where_logits_weigh():
    """HPR on a 17M-parameter GPT-2 shape with a 32,768 vocabulary: the logits and their gradient
    are a quarter of the peak (fresh process, peak RSS; `pcbench bench memory`'s measurement)."""
    p, measured = _plan_vs_measured("hpr", 32768)
    assert p.components["logits"] > 0.2 * p.peak
    assert abs(p.peak - measured) <= 0.05 * measured


@pytest.mark.slow
def test_pc_plan_vs_measured_within_5_percent_where_logits_weigh():
    p, measured = _plan_vs_measured("pc", 32768)
    assert abs(p.peak - measured) <= 0.05 * measured


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _llama3_2_1b_cell(method: str, compression: float) -> dict:
    return {"method": method, "world": 1, "parallel": "ddp", "size": "llama3.2-1b", "vocab": 128256, "seq": 16,
            "rows": 2, "micro": 1, "steps": 2, "compression": compression, "threads": 2, "device": "cpu",
            "tokenizer": "llama3"}


def _plan_of(cfg: dict, d: str) -> memory.MemoryPlan:
    from pcbench.bench import memory as bench

    bench.write_config(cfg, Path(d))
    cfg["config_dir"] = d
    return memory.plan(load_run_spec(bench.cell_spec(cfg, d)), 1, device="cpu")


def _through_the_step(cfg: dict, d: str, what: str) -> tuple[memory.MemoryPlan, int]:
    """The plan and the measured peak of two optimiser steps of the cell (skipped without the memory)."""
    from pcbench.bench import memory as bench

    p = _plan_of(cfg, d)
    need = p.peak + 2 * 2**30  # the base (4.9 GB) and the pruned copy while building stay below the peak
    if _mem_available() < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free")
    ranks = bench.measure(cfg)  # two optimiser steps of the 1B shape (a failing step raises here)
    measured = max(r["peak"] for r in ranks)
    print(f"llama3.2-1b shape {what}: plan {p.peak / 2**30:.2f} GiB ({p.peak_phase}), measured "
          f"{measured / 2**30:.2f} GiB, error {100 * (p.peak - measured) / measured:+.1f}%")
    assert measured > ranks[0]["persistent"] > 0
    return p, measured


@pytest.mark.slow
def test_llama3_2_1b_shape_through_the_step_hpr_50(tmp_path):
    """The shape the poster's grid runs (Llama-3.2-1B: 16 layers, d 2048, GQA 32/8, d_ff 8192, tied
    128,256 vocabulary; random init), its packaged tokenizer's ids, HPR at 50%: two optimiser steps
    on CPU at sequence 16, the plan within 5% of the measured peak. The peak is the tied
    embedding's backward (three [vocab, d] gradients at once beside the accumulated ones), which
    the plan once missed (-6.1%)."""
    p, measured = _through_the_step(_llama3_2_1b_cell("hpr", 0.5), str(tmp_path), "HPR 50%")
    assert p.peak_phase == "embedding_backward"
    assert abs(p.peak - measured) <= 0.05 * measured


def pc_level_fitting(gb: float, tmp: Path) -> float:
    """The least compression (0.01 steps) at which PC's plan of the 1B cell fits a `gb` GB card."""
    lo, hi = 50, 99  # percent: hi fits, lo is searched up from
    assert _plan_of(_llama3_2_1b_cell("pc", hi / 100), str(tmp)).fits(gb)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _plan_of(_llama3_2_1b_cell("pc", mid / 100), str(tmp)).fits(gb):
            hi = mid
        else:
            lo = mid
    return hi / 100


@pytest.mark.slow
def test_llama3_2_1b_shape_through_the_step_pc_at_the_level_fitting_20_gb(tmp_path):
    """The same shape under PC at the least compression whose plan fits 20 GB (`MemoryPlan.fits`:
    the peak plus the runtime's reserve): two optimiser steps, the plan within 5% of the peak."""
    level = pc_level_fitting(20, tmp_path)
    assert not _plan_of(_llama3_2_1b_cell("pc", level - 0.01), str(tmp_path)).fits(20)
    p, measured = _through_the_step(_llama3_2_1b_cell("pc", level), str(tmp_path), f"PC at {level:.2f}")
    assert abs(p.peak - measured) <= 0.05 * measured


def test_fsdp_pc_plans_the_row_sharded_step(tmp_path):
    """Under fsdp each rank keeps B_r (its rows of W P_in) from before_step to the push for every
    tensor with P_out (gate, up, down; o_proj's B is W itself: gathered once and kept whole, in the
    base's dtype), and one tensor's step holds P_in and B gathered, H and dP_in's partial sum,
    never W gathered where there is an input side."""
    spec = tiny_spec(tmp_path, "pc")
    w = memory.widths(memory.model_config(spec), 0.5)
    dc, fc = w["d_model"], w["d_ff"]
    p = memory.plan(spec, 2, parallel="fsdp")
    c = p.components
    assert c["step_cache"] == 4 * L * (2 * (F // 2) * dc + (D // 2) * fc + D * HQ)
    o_proj = memory._Proj("o_proj", (D, HQ), (dc, HQ), True, False, False, True)
    assert memory._row_sharded_step(o_proj, 2, 4, False) == (4 * D * HQ, 4 * D * HQ)  # W gathered, kept
    # a bf16 base is kept in bf16; the products' fp32 copy is a transient of each use
    assert memory._row_sharded_step(o_proj, 2, 2, False) == (2 * D * HQ, (2 + 4) * D * HQ)
    assert p.phases["push"] >= c["step_cache"] + c["push_transient"] + p.persistent
    down = memory._Proj("down", (D, F), (dc, fc), True, True, False, True)
    kept, transient = memory._row_sharded_step(down, 2, 4, False)
    assert kept == 4 * (D // 2) * fc
    materialise = 4 * (F * fc + D // 2 * fc + D * fc)  # P_in, B_r, B
    push = 4 * max(D * fc, (D + D // 2) * fc, D // 2 * fc + F * fc)  # B; H and its rows; H's rows and dP_in
    assert transient == max(materialise, push) < 4 * D * F + 4 * F * fc  # what gathering W and P_in held
    # a bf16 base: W_r cast to fp32 for dP_in's product; under bf16 fixed precision B_r is kept in bf16
    assert memory._row_sharded_step(down, 2, 2, False)[1] == max(materialise, push + 4 * (D // 2) * F)
    assert memory._row_sharded_step(down, 2, 2, True)[0] == kept // 2
