"""The one training loop: bit-exact resume after SIGKILL, DDP == one process, HF round trip,
corrupt checkpoints, non-finite losses and bad specs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pcbench.train import checkpoint
from pcbench.util.atomic import read_jsonl
from pcbench.spec.config import SpecError, load_run_spec
from pcbench.train.loop import NonFiniteLoss, RunPaths, export_model, lm_loss, lr_factor, train

ROOT = Path(__file__).resolve().parents[1]

BASE_SPEC = {
    "model": {"name": "gpt2-nano"},
    "data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 32, "eval_batches": 2},
    "train": {"steps": 24, "batch_size": 8, "micro_batch_size": 4, "log_every": 1, "ckpt_every": 4,
              "threads": 1, "device": "cpu"},
    "optim": {"lr": 0.01, "warmup": 3},
}


def spec_of(**over):
    d = json.loads(json.dumps(BASE_SPEC))
    for section, fields in over.items():
        d.setdefault(section, {}).update(fields)
    return load_run_spec(d)


def paths(tmp: Path, name: str) -> RunPaths:
    return RunPaths(record=tmp / name / "record", work=tmp / name / "work")


def losses(p: RunPaths) -> list[float]:
    return [r["loss"] for r in read_jsonl(p.metrics)]


def weights(p: RunPaths) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(p.model / "model.safetensors"))


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, **kw)


def test_lr_schedule_shape():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, 0.1, 0.1) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.1) and f[warm] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:warm], f[1:warm + 1]))  # linear warm-up
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))  # cosine decay
    assert f[total] == pytest.approx(0.1)


def test_distillation_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    loss, ce = lm_loss(s, y, t, alpha=0.5, temperature=2.0)
    ref_ce = torch.nn.functional.cross_entropy(s.flatten(0, 1), y.flatten())
    p_t = torch.softmax(t / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(loss, 0.5 * ref_ce + 0.5 * 4 * kl)
    plain, ce0 = lm_loss(s, y, t, alpha=0.0)
    assert plain is ce0  # no teacher term when alpha is 0


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    p = paths(tmp, "ref")
    rec = train(spec_of(), p, progress=False)
    return p, rec


def test_sigkill_then_resume_is_bit_exact(reference_run, tmp_path):
    ref_paths, ref = reference_run
    spec_file = tmp_path / "spec.yaml"
    long = json.loads(json.dumps(BASE_SPEC))
    long["train"].update(steps=400, ckpt_every=8)
    spec_file.write_text(yaml.safe_dump(long))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pcbench.cli", "train", str(spec_file), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "work" / "ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.list_checkpoints(ckpts):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.list_checkpoints(ckpts), "no checkpoint was written before the kill"
    assert not (out / "record" / "final.json").exists(), "the run finished before it was killed"
    killed_at = int(checkpoint.list_checkpoints(ckpts)[-1].name.split("_")[1])
    assert 0 < killed_at < 400
    # Resume in this process, and compare with an uninterrupted run of the same spec.
    spec = load_run_spec(long)
    p = RunPaths(record=out / "record", work=out / "work", export=out / "model")
    rec = train(spec, p, progress=False)
    assert rec["resumed_from"] >= killed_at
    full = paths(tmp_path, "full")
    ref_long = train(spec, full, progress=False)
    assert rec["train_loss_last100"] == ref_long["train_loss_last100"]  # bit for bit
    assert rec["final_train_loss"] == ref_long["final_train_loss"]
    assert losses(p) == losses(full)  # the whole curve, with no duplicated or missing step
    assert [r["step"] for r in read_jsonl(p.metrics)] == list(range(1, 401))
    a, b = weights(p), weights(full)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigterm_stops_train_at_a_step_boundary_then_the_same_command_resumes(tmp_path):
    """`pcbench train` stops like a run job: SIGTERM (scancel, a preemption) gives a checkpoint of
    the step it stopped after, one line naming it and exit 143 (not death by the signal)."""
    spec_file = tmp_path / "spec.yaml"
    long = json.loads(json.dumps(BASE_SPEC))
    long["train"].update(steps=400, ckpt_every=1000, log_every=1)  # the stop's is the only checkpoint
    spec_file.write_text(yaml.safe_dump(long))
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pcbench.cli", "train", str(spec_file), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "record" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "interrupted by SIGTERM at step" in ln]
    assert len(lines) == 1 and "resumes it" in lines[0], err
    step = int(lines[0].split("at step ")[1].split(";")[0])
    ckpts = checkpoint.list_checkpoints(out / "work" / "ckpt")
    assert 0 < step < 400 and [int(c.name.split("_")[1]) for c in ckpts] == [step]
    rec = train(load_run_spec(long), RunPaths(record=out / "record", work=out / "work", export=out / "model"),
                progress=False)
    assert rec["resumed_from"] == step
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, 401))


def test_resume_skips_a_corrupt_checkpoint(reference_run, tmp_path):
    ref_paths, ref = reference_run
    spec = spec_of()
    p = paths(tmp_path, "r")
    # Run to the end (checkpoints at steps 16 and 20 are kept), truncate the newest, run again.
    train(spec, p, progress=False)
    ckpts = checkpoint.list_checkpoints(p.ckpt)
    assert len(ckpts) == 2  # keep_checkpoints
    newest = ckpts[-1] / "state.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(checkpoint.CorruptCheckpoint, match="truncated"):
        checkpoint.verify(ckpts[-1])
    p.final.unlink()
    rec = train(spec, p, progress=False)
    assert rec["checkpoint_problems"] and "truncated" in rec["checkpoint_problems"][0]
    assert rec["resumed_from"] == int(ckpts[0].name.split("_")[1])
    assert (ckpts[-1].parent / (ckpts[-1].name + ".corrupt")).exists()  # kept, not deleted
    assert rec["train_loss_last100"] == ref["train_loss_last100"]
    # Every checkpoint damaged: a warning line, a fresh start with the same numbers; the files kept.
    for c in checkpoint.list_checkpoints(p.ckpt):
        (c / "state.pt").write_bytes(b"garbage")
    p.final.unlink()
    rec = train(spec, p, progress=False)
    assert rec["resumed_from"] == 0 and rec["train_loss_last100"] == ref["train_loss_last100"]
    assert len(list(p.ckpt.glob("*.corrupt*"))) == 3


def test_export_is_a_stock_hf_checkpoint(reference_run):
    p, rec = reference_run
    model = AutoModelForCausalLM.from_pretrained(p.model, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(p.model)
    assert type(model).__name__ == "ArceeForCausalLM" and model.config.hidden_act == "relu"
    assert not model.config.tie_word_embeddings
    ids = torch.tensor([tok("It was a bright cold day in April.").input_ids])
    logits = model(input_ids=ids).logits
    # Save again through our exporter and reload: identical logits.
    out = p.work / "again"
    export_model(model, tok, out)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(again(input_ids=ids).logits, logits)
    # The export is the trained network: its held-out loss is the recorded one.
    from pcbench.data.tokens import eval_batches, prepare_tokens
    from pcbench.evaluate import heldout_loss

    store = prepare_tokens("sotu", "bpe-512", "test")
    held = heldout_loss(model, eval_batches(store, 32, 4, 2), torch.device("cpu"))
    assert held == pytest.approx(rec["heldout_loss"], rel=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("method", [pytest.param("pretrain", marks=pytest.mark.slow), "pc"])
def test_two_process_ddp_matches_one_process(reference_run, tmp_path, method):
    ref_paths, _ = reference_run
    d = json.loads(json.dumps(BASE_SPEC))
    d["train"].update(steps=8, ckpt_every=0)
    if method == "pc":
        d["model"] = {"name": "hf", "path": str(ref_paths.model)}
        d["compress"] = {"method": "pc", "compression": 0.5}
        d["optim"]["lr"] = 0.003
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(d))
    one = tmp_path / "one"
    r1 = run_cli(["pcbench.cli", "train", str(spec_file), "--out", str(one)], timeout=600)
    assert r1.returncode == 0, r1.stderr[-2000:]
    two = tmp_path / "two"
    r2 = run_cli(["torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "pcbench.cli", "train",
                  str(spec_file), "--out", str(two)], timeout=600)
    assert r2.returncode == 0, r2.stderr[-2000:]
    l1 = [r["loss"] for r in read_jsonl(one / "record" / "metrics.jsonl")]
    l2 = [r["loss"] for r in read_jsonl(two / "record" / "metrics.jsonl")]
    assert len(l1) == len(l2) == 8
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    f2 = json.loads((two / "record" / "final.json").read_text())
    assert f2["world_size"] == 2
    from safetensors.torch import load_file

    w1, w2 = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    spec = spec_of(optim={"lr": 1e30, "warmup": 0, "grad_clip": 0.0}, train={"ckpt_every": 1, "steps": 40})
    p = paths(tmp_path, "nan")
    with pytest.raises(NonFiniteLoss) as e:
        train(spec, p, progress=False)
    step = e.value.step
    assert 0 < step < 40
    ckpts = checkpoint.list_checkpoints(p.ckpt)
    assert ckpts and int(ckpts[-1].name.split("_")[1]) == step  # state before the bad step
    state = checkpoint.load(ckpts[-1])
    assert all(torch.isfinite(v).all() for v in state["trainable"].values() if v.is_floating_point())
    assert not p.final.exists()


def test_non_finite_loss_marks_the_run_failed(tmp_path):
    from pcbench.run.jobs import RunJob
    from pcbench.store import Store

    store = Store(tmp_path / "res", tmp_path / "work")
    spec = json.loads(json.dumps(BASE_SPEC))
    spec["optim"].update(lr=1e30, warmup=0, grad_clip=0.0)
    store.write_run({"id": "r1", "stage": "s", "kind": "train", "labels": {}, "spec": spec, "deps": [],
                     "tune": None})
    with pytest.raises(NonFiniteLoss):
        RunJob(str(store.root), str(store.work), "r1", progress=False)()
    st = store.status("r1")
    assert st["state"] == "failed" and "non-finite" in st["error"] and st["step"] > 0


@pytest.mark.parametrize("mutate,field,why", [
    (lambda d: d["train"].pop("steps"), "spec.train", "exactly one of"),
    (lambda d: d["train"].__setitem__("batchsize", 8), "spec.train.batchsize", "did you mean 'batch_size'"),
    (lambda d: d["optim"].__setitem__("lr", "fast"), "spec.optim.lr", "number"),
    (lambda d: d["model"].__setitem__("name", "gpt9"), "spec.model.name", "unknown model"),
    (lambda d: d["data"].__setitem__("tokenizer", "sentencepiece"), "spec.data.tokenizer", "unknown tokenizer"),
    (lambda d: d["data"].__setitem__("corpus", "wikipedia"), "spec.data.corpus", "unknown corpus"),
    (lambda d: d["model"].update(d_model=30, heads=4), "spec.model.d_model", "multiple of heads"),
    (lambda d: d["model"].update(heads=4, kv_heads=3), "spec.model.kv_heads", "multiple"),
    (lambda d: d["train"].update(micro_batch_size=3), "spec.train.micro_batch_size", "divide"),
    (lambda d: d.__setitem__("compress", {"method": "pc", "compression": 0.5}), "spec.model.path", "pretrained"),
    (lambda d: d.__setitem__("compress", {"method": "pc", "compression": 50}), "spec.compress.compression",
     "fraction"),
])
def test_bad_specs_fail_before_any_work(mutate, field, why, tmp_path):
    d = json.loads(json.dumps(BASE_SPEC))
    mutate(d)
    with pytest.raises(SpecError) as e:
        load_run_spec(d)
    assert field in str(e.value) and why in str(e.value), str(e.value)


def test_bad_spec_file_through_the_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: gpt2-nano}\ntrain: {steps: 2, batch_sise: 4}\n")
    r = run_cli(["pcbench.cli", "train", str(bad), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "train.batch_sise" in r.stderr and "did you mean 'batch_size'" in r.stderr
    assert not (tmp_path / "o").exists()  # nothing started


def test_work_identity_names_a_base_without_a_marker_by_its_files(tmp_path):
    """A base checkpoint pcbench did not write (no marker) replaced in place: the run's work state
    made from the old one no longer belongs to it (`work_identity` differs), so it is not resumed."""
    from types import SimpleNamespace

    from pcbench.train.loop import work_identity

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "arcee"}')
    (base / "model.safetensors").write_bytes(b"A" * 64)
    spec = spec_of(model={"name": "hf", "path": str(base)})
    store = SimpleNamespace(path=tmp_path / "store-key", meta={"tokens_sha256": "0" * 64})
    first = work_identity(spec, store, "lin")
    assert first["base"] is not None and work_identity(spec, store, "lin") == first
    (base / ".cache").mkdir()  # hidden files are not the model
    (base / ".cache" / "x").write_text("x")
    assert work_identity(spec, store, "lin") == first
    (base / "model.safetensors").write_bytes(b"B" * 64)  # same size, other weights
    assert work_identity(spec, store, "lin")["base"] != first["base"]


def test_checkpoints_ahead_of_the_records_are_not_resumed(tmp_path, capfd):
    """Records restored from an earlier copy (or deleted) while the work state went on: resuming
    from a checkpoint past the records' last line would leave a gap in metrics.jsonl. Those
    checkpoints are set aside with one line; the curve and losses are an uninterrupted run's."""
    spec = spec_of()
    p = paths(tmp_path, "a")
    train(spec, p, progress=False)
    full = losses(p)
    lines = p.metrics.read_text().splitlines(keepends=True)
    p.metrics.write_text("".join(lines[:8]))  # the records as an earlier copy had them: step 8
    p.final.unlink()
    capfd.readouterr()
    train(spec, p, progress=False)
    assert "ahead of the run's records" in capfd.readouterr().err
    assert [r["step"] for r in read_jsonl(p.metrics)] == list(range(1, 25))
    assert losses(p) == full
    train(spec, p, progress=False)  # its own checkpoints: resumed, without a word
    assert "ahead" not in capfd.readouterr().err and losses(p) == full


@pytest.mark.parametrize("rank", ["0", "1"])
def test_train_summary_line_only_from_the_main_rank(rank, tmp_path, monkeypatch, capsys):
    """Under torchrun every rank runs `pcbench train`; only rank 0 has the export and the held-out
    loss (NaN elsewhere), so only it prints the summary line, and that line is valid JSON."""
    import math

    from pcbench import cli
    from pcbench.run import prepare
    from pcbench.train import loop

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(BASE_SPEC))
    rec = {"train_loss_last100": 5.0, "heldout_loss": math.nan} | ({"export_path": "m"} if rank == "0" else {})
    monkeypatch.setattr(prepare, "prepare_spec", lambda spec: [])
    monkeypatch.setattr(loop, "train", lambda *a, **k: rec)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", str(spec), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    if rank == "1":
        assert out == ""
    else:
        assert json.loads(out) == {"train_loss_last100": 5.0, "heldout_loss": None, "export_path": "m"}


@pytest.mark.parametrize("ckpt_every", [0, 2])
def test_a_run_that_starts_over_moves_the_earlier_records_aside(tmp_path, ckpt_every, capfd):
    """`train A --out t` completes, then `train B --out t` (another spec, which diverges): B starts
    over, and A's final record and metric lines are moved aside with A's state, so the records
    never hold A's final loss beside B's curve (with or without checkpoints to move)."""
    a = spec_of(train={"steps": 4, "ckpt_every": ckpt_every})
    b = spec_of(optim={"lr": 1e30, "warmup": 0, "grad_clip": 0.0}, train={"steps": 40, "ckpt_every": ckpt_every})
    t = tmp_path / "t"  # as `pcbench train --out t` lays it out (the export outside the work state)
    p = RunPaths(record=t / "record", work=t / "work", export=t / "model")
    rec_a = train(a, p, progress=False)
    capfd.readouterr()
    with pytest.raises(NonFiniteLoss):
        train(b, p, progress=False)
    assert not p.final.exists()  # no final record: B failed, A's is not B's
    aside = list((p.work / ".stale").glob("*/*/record/final.json"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["train_loss_last100"] == rec_a["train_loss_last100"]
    assert len(read_jsonl(aside[0].parent / "metrics.jsonl")) == 4  # A's curve, whole
    err = capfd.readouterr().err
    assert err.count("pcbench: warning:") == 1, err  # one line: the state's (naming where) or the records'
    assert ("state left by other records" if ckpt_every else "records of the earlier run") in err, err


@pytest.mark.parametrize("cap", [1, 100, 263])
def test_a_store_too_small_for_one_batch_is_one_line_naming_max_tokens(tmp_path, cap):
    """`data.max_tokens` below one window, or below one batch (8 x 33 = 264 tokens): the store cannot
    feed a step. Refused in one line naming the field (rc 2) before any work, not a ValueError from
    the sampler as "a bug" after the run started. (A small corpus under a large cap: the loop's own
    check, `loop._batches`, says the same.)"""
    needle = "hold less than one batch"
    d = json.loads(json.dumps(BASE_SPEC))
    d["data"]["max_tokens"] = cap
    spec = tmp_path / "small.yaml"
    spec.write_text(yaml.safe_dump(d))
    r = run_cli(["pcbench.cli", "train", str(spec), "--out", str(tmp_path / "o")], timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "a bug" not in r.stderr, r.stderr
    assert "data.max_tokens" in r.stderr and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()
