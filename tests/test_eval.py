"""Downstream evaluation: the local lm-eval task suite, `lm_eval_scores`, the `lm_eval` CLI, `run_eval`.

Everything runs offline: local tasks read JSONL files, the model is a tiny random checkpoint, the
scoring itself runs with sockets blocked, and the CLI with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE.
The suite is built into a private cache that links to the ambient cache's assets.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pcbench.data import assets, corpora, tasks
from pcbench.util.atomic import read_json, write_json
from pcbench.spec.config import EvalSpec, ModelSpec, SpecError
from pcbench.evaluate import lm_eval_scores, primary_metric, run_eval
from pcbench.models import build_config, build_model
from pcbench.store import Store
from pcbench.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 300  # examples per task scored in-process (the random model's chance level needs a few hundred)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model runs fastest on one thread (and 10x slower with 2 when another job holds a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bpe-512")  # from the ambient cache, before `private_cache` switches


@pytest.fixture(scope="module")
def tiny_model(tok, tmp_path_factory) -> Path:
    """A randomly initialised gpt2-nano (64-token window) saved with its bpe-512 tokenizer."""
    model = build_model(build_config(ModelSpec(name="gpt2-nano"), 512, 64, tok.bos_token_id, tok.eos_token_id), seed=0)
    out = tmp_path_factory.mktemp("nano")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def private_cache(tiny_model, tmp_path_factory):
    """PCBENCH_CACHE -> a fresh directory whose assets link to the ambient ones."""
    assets.fetch("sotu")
    root = tmp_path_factory.mktemp("cache")
    (root / "assets").symlink_to(assets.cache_dir() / "assets", target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PCBENCH_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def suite(private_cache) -> Path:
    return tasks.build_tasks()


@pytest.fixture(scope="module")
def addresses() -> list[str]:
    return [tasks.clean_text(d) for d in corpora.iter_documents("sotu", "test")]


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access during evaluation: {args}")


@pytest.fixture(scope="module")
def scores(tiny_model, suite):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        start = time.perf_counter()
        out = lm_eval_scores(EvalSpec(model=str(tiny_model), limit=LIMIT, batch_size=32, device="cpu"))
        out["_seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------------------------
# The suite


def test_sentence_splitting_and_cleaning():
    text = tasks.clean_text("Thank you. (Applause.) Mr. Speaker, the U.S. Navy sailed on Jan. 5. "
                            "Gen. U. S. Grant agreed.  Did he? \"Yes.\" Madam Vice President—(applause)—no one")
    assert "pplause" not in text and "  " not in text
    assert tasks.split_sentences(text) == [
        "Thank you.", "Mr. Speaker, the U.S. Navy sailed on Jan. 5.", "Gen. U. S. Grant agreed.", "Did he?",
        "\"Yes.\"", "Madam Vice President—no one"]


def test_build_is_deterministic_reused_and_repaired(suite, tmp_path):
    other = tasks.build_tasks(tmp_path / "other")
    assert other == (tmp_path / "other").resolve() and suite.name == tasks.suite_key()
    for name in ("pcb_cloze.jsonl", "pcb_continuation.jsonl", "pcbench_local.yaml"):
        assert (suite / name).read_bytes() == (other / name).read_bytes(), name
    for name in ("pcb_cloze.yaml", "pcb_continuation.yaml"):  # equal up to the absolute data path
        a = (suite / name).read_text().replace(str(suite), "DIR")
        assert a == (other / name).read_text().replace(str(other), "DIR")
        assert f'test: "{suite / name.replace(".yaml", ".jsonl")}"' in (suite / name).read_text()
    info = read_json(suite / "suite.json")
    assert info["examples"] == tasks.EXAMPLES and info["key"] == suite.name
    stamp = (suite / "pcb_cloze.jsonl").stat().st_mtime_ns
    assert tasks.build_tasks() == suite and (suite / "pcb_cloze.jsonl").stat().st_mtime_ns == stamp  # reused
    good = (other / "pcb_continuation.jsonl").read_bytes()
    (other / "pcb_continuation.jsonl").write_bytes(good[:1000])  # a damaged suite is rebuilt
    assert tasks.build_tasks(other) == other and (other / "pcb_continuation.jsonl").read_bytes() == good


def test_concurrent_builds_agree(private_cache, tmp_path):
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: tasks.build_tasks(tmp_path / "shared"), range(4)))
    assert set(outs) == {(tmp_path / "shared").resolve()}
    assert read_json(outs[0] / "suite.json")["examples"] == tasks.EXAMPLES
    assert not [p for p in outs[0].iterdir() if p.name.endswith(".tmp")]


def test_a_suite_writer_killed_midway_leaves_nothing_that_blocks_the_next(private_cache, tmp_path):
    """`pcbench tasks --out DIR` SIGKILLed while writing: DIR is the whole suite or absent, and the
    next build succeeds and leaves no temp dir; a suite an older pcbench was killed writing in place
    (its `.lock` inside, no suite.json) is rebuilt, not refused."""
    out = tmp_path / "killed"
    code = ("import os, signal, sys\n"
            "from pcbench.data import tasks\n"
            "real, n = tasks.write_bytes, []\n"
            "def dying(path, data):\n"
            "    n.append(path)\n"
            "    if len(n) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(path, data)\n"
            "tasks.write_bytes = dying\n"
            "tasks.build_tasks(__import__('pathlib').Path(sys.argv[1]))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert not out.exists()
    assert tasks.build_tasks(out) == out.resolve() and read_json(out / "suite.json")["examples"] == tasks.EXAMPLES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]
    old = tmp_path / "old"
    old.mkdir()
    (old / ".lock").touch()
    (old / "pcb_cloze.jsonl").write_text("half")
    r = subprocess.run([sys.executable, "-m", "pcbench.cli", "tasks", "--out", str(old)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_json(old / "suite.json")["examples"] == tasks.EXAMPLES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "old"]


def test_cloze_examples_are_well_formed(suite, addresses):
    rows = list(tasks.iter_examples(suite, "pcb_cloze"))
    assert len(rows) == tasks.EXAMPLES["pcb_cloze"] == 1000
    assert [r["id"] for r in rows] == list(range(len(rows)))
    assert len({r["context"] for r in rows}) == len(rows)
    for r in rows:
        target, context = r["target"], r["context"]
        assert re.fullmatch(r"[A-Za-z]{3,}", target), r
        assert r["text"] == f"{context} {target}" and context == context.strip()
        assert not re.search(rf"\b{target}\b", context, re.IGNORECASE), r  # not copyable from the context
        assert 50 <= len(r["text"].split()) <= 120
        assert r["text"] in addresses[r["address"]]  # a real passage, followed by . ! or ?
        assert addresses[r["address"]][addresses[r["address"]].index(r["text"]) + len(r["text"])] in ".!?"
    per_address = Counter(r["address"] for r in rows)
    assert len(per_address) > 200 and max(per_address.values()) <= 6  # spread over the eras


def test_continuation_examples_are_well_formed(suite, addresses):
    rows = list(tasks.iter_examples(suite, "pcb_continuation"))
    assert len(rows) == tasks.EXAMPLES["pcb_continuation"] == 1000
    assert [r["id"] for r in rows] == list(range(len(rows)))
    labels = Counter(r["label"] for r in rows)
    assert set(labels) == {0, 1, 2, 3} and min(labels.values()) > 200
    for pick in (min, max):  # choosing by length is no better than chance
        hits = sum(pick(range(4), key=lambda i: len(r["choices"][i])) == r["label"] for r in rows)
        assert 0.2 < hits / len(rows) < 0.3
    for r in rows:
        choices, label, doc = r["choices"], r["label"], addresses[r["address"]]
        assert len(choices) == 4 and len({c.lower() for c in choices}) == 4, r
        true = [i for i, c in enumerate(choices) if f"{r['context']} {c}" in doc]
        assert true == [label], r  # exactly one choice really continues the context
        assert len(r["context"].split()) >= 30 and len(tasks.split_sentences(r["context"])) >= 2
        bins = {tasks._length_bin(c) for c in choices}
        assert len(bins) == 1, r  # same length bin: length gives nothing away
        for c in choices:
            assert 5 <= len(c.split()) <= 14 and len(c) <= 75 and c[0].isupper() and c[-1] in ".!?"
            assert c.lower() not in r["context"].lower()
        others = r["distractor_addresses"]
        assert len(others) == 3 and r["address"] not in others
        assert all(abs(o - r["address"]) <= tasks.NEIGHBOURS for o in others)
        distractors = [c for i, c in enumerate(choices) if i != label]
        assert all(c in addresses[o] for c, o in zip(distractors, others))


def test_choices_fit_the_smallest_window(suite, tok):  # bpe-512: the costliest, ~2.7 tokens per word
    rows = list(tasks.iter_examples(suite, "pcb_continuation"))
    longest = max(len(tok(" " + c).input_ids) for r in rows for c in r["choices"])
    assert longest <= 56  # a 64-token model still sees >= 8 context tokens


# ---------------------------------------------------------------------------------------------
# Scoring


def test_primary_metric_convention():
    both = {"acc": 0.3, "acc_norm": 0.4}
    assert [primary_metric(t, both) for t in ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa")] \
        == ["acc_norm"] * 5
    assert [primary_metric(t, both) for t in ("sciq", "pcb_continuation")] == ["acc", "acc"]
    assert primary_metric("winogrande", {"acc": 0.5}) == "acc"
    assert primary_metric("wikitext", {"word_perplexity": 30.0}) is None


def test_random_model_scores(scores, tiny_model, suite):
    assert scores["model"] == str(tiny_model) and scores["suite"] == str(suite)
    assert set(scores["tasks"]) == {"pcb_cloze", "pcb_continuation"} and scores["groups"] == {}
    cloze, cont = scores["tasks"]["pcb_cloze"], scores["tasks"]["pcb_continuation"]
    assert set(cloze) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    assert set(cont) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    for m in ("acc", "acc_norm"):
        assert 0 <= cont[m] <= 1 and 0 < cont[f"{m}_stderr"] < 0.05
    assert 0 <= cloze["acc"] <= 0.05 and cloze["perplexity"] > 1  # a random model knows no words
    assert abs(cont["acc"] - 0.25) < 0.1 and abs(cont["acc_norm"] - 0.25) < 0.1  # chance
    assert scores["primary"] == {"pcb_cloze": "acc", "pcb_continuation": "acc"}
    assert scores["average"] == pytest.approx((cloze["acc"] + cont["acc"]) / 2)
    assert scores["samples"] == {"pcb_cloze": LIMIT, "pcb_continuation": LIMIT}
    assert scores["limit"] == LIMIT and scores["num_fewshot"] == 0 and scores["device"] == "cpu"
    assert scores["lm_eval_version"] == "0.4.13" and scores["versions"]["pcb_cloze"] == 1.0
    json.dumps(scores, allow_nan=False)  # plain JSON
    print(f"tiny model, {LIMIT} examples per task: {scores['_seconds']:.1f}s")


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_cli_gives_the_same_scores(scores, tiny_model, suite, tmp_path):
    out = tmp_path / "lm_eval_out"
    cmd = ["lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={tiny_model},tokenizer={tiny_model}",
           "--tasks", "pcb_cloze,pcb_continuation", "--include_path", str(suite), "--limit", str(LIMIT),
           "--batch_size", "32", "--device", "cpu", "--output_path", str(out)]
    exe = Path(sys.executable).with_name("lm_eval")
    cmd[0] = str(exe) if exe.exists() else "lm_eval"
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **OFFLINE_ENV, "LMEVAL_LOG_LEVEL": "WARNING",
                                                   "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    res = json.loads(result.read_text())["results"]
    for task in ("pcb_cloze", "pcb_continuation"):
        for metric, value in scores["tasks"][task].items():
            if not metric.endswith("_stderr") or metric.startswith("acc"):  # perplexity stderr: bootstrap
                assert res[task][f"{metric},none"] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, metric)


class _Oracle:
    """An lm-eval LM that has memorised the addresses: a continuation is likely iff the text exists."""

    def __init__(self, addresses: list[str]):
        from lm_eval.api.model import LM

        class Oracle(LM):
            def loglikelihood(self, requests, disable_tqdm=False):
                out = []
                for req in requests:
                    ctx, cont = req.args
                    seen = any(ctx + cont in a for a in addresses)
                    out.append((0.0, True) if seen else (-100.0 - len(cont), False))
                return out

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

        self.lm = Oracle()


def test_a_model_that_knows_the_text_scores_perfectly(suite, addresses):
    """The labels, targets and delimiters reach lm-eval as intended (random scores alone can't tell)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(suite), include_defaults=False)
    out = lm_eval.simple_evaluate(model=_Oracle(addresses).lm, tasks=["pcbench_local"], limit=60,
                                  task_manager=tm, log_samples=False, bootstrap_iters=0)
    res = out["results"]
    assert res["pcb_cloze"]["acc,none"] == 1.0 and res["pcb_cloze"]["perplexity,none"] == 1.0
    assert res["pcb_continuation"]["acc,none"] == 1.0 and res["pcb_continuation"]["acc_norm,none"] == 1.0
    assert res["pcbench_local"]["acc,none"] == 1.0


def test_a_trained_model_that_knows_the_text_beats_chance(tok, suite, tmp_path):
    """gpt2-nano trained to memorise the first K passages of each task scores ~1 on them (random: 0 / 0.25),
    through the whole HFLM path: tokenisation, left truncation to the 64-token window, delimiters."""
    k = 32
    texts = [r["context"] + " " + r["choices"][r["label"]] for r in tasks.iter_examples(suite, "pcb_continuation")]
    texts = texts[:k] + [r["text"] for r in list(tasks.iter_examples(suite, "pcb_cloze"))[:k]]
    batch = torch.tensor([tok(t).input_ids[-65:] for t in texts])  # the window lm-eval scores
    model = build_model(build_config(ModelSpec(name="gpt2-nano"), 512, 64, tok.bos_token_id, tok.eos_token_id), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    model.save_pretrained(tmp_path / "memo")
    tok.save_pretrained(tmp_path / "memo")
    got = lm_eval_scores(EvalSpec(model=str(tmp_path / "memo"), limit=k, device="cpu"))["tasks"]
    assert got["pcb_cloze"]["acc"] >= 0.75 and got["pcb_continuation"]["acc"] >= 0.75, got


def test_group_and_unknown_tasks(tiny_model, suite):
    got = lm_eval_scores(EvalSpec(model=str(tiny_model), tasks=["pcbench_local"], limit=20, device="cpu"))
    assert set(got["tasks"]) == {"pcb_cloze", "pcb_continuation"} and set(got["groups"]) == {"pcbench_local"}
    assert got["groups"]["pcbench_local"]["acc"] == pytest.approx(got["average"])
    with pytest.raises(SpecError, match="pcb_clozee.*did you mean pcb_cloze"):
        lm_eval_scores(EvalSpec(model=str(tiny_model), tasks=["pcb_clozee"], limit=5, device="cpu"))
    with pytest.raises(SpecError, match="not a Hugging Face checkpoint"):
        lm_eval_scores(EvalSpec(model=str(suite), limit=5, device="cpu"))


def test_hub_task_offline_fails_fast_and_clearly(tiny_model, suite, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    try:
        lm_eval_scores(EvalSpec(model=str(tiny_model), tasks=["arc_easy", "pcb_cloze"], limit=2, device="cpu"))
    except RuntimeError as e:
        assert "arc_easy" in str(e) and "offline mode" in str(e), e
    else:
        pytest.skip("arc_easy is in the local datasets cache")
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------------------------------------
# Grid runs


def test_run_eval_resolves_the_parent_run(tiny_model, suite, tmp_path):
    from pcbench.run.jobs import RunJob

    store = Store(tmp_path / "results", tmp_path / "work")
    store.write_run({"id": "pc-0", "stage": "compress", "kind": "train", "labels": {}, "spec": {}, "deps": []})
    run = {"id": "eval-0", "stage": "eval", "kind": "eval", "labels": {"method": "pc"}, "deps": ["pc-0"],
           "spec": {"model": "run:pc-0", "limit": 20, "batch_size": 8, "device": "cpu"}, "tune": None}
    store.write_run(run)
    with pytest.raises(SpecError, match="run pc-0 has no exported model"):
        run_eval(run, store)
    write_json(store.paths("pc-0").final, {"export_path": str(tiny_model), "train_loss_last100": 6.0})
    store.set_status("pc-0", "completed")
    RunJob(str(store.root), str(store.work), "eval-0")()
    assert store.state("eval-0") == "completed"
    rec = store.eval_result("eval-0")
    assert rec["parent"] == "pc-0" and rec["model"] == str(tiny_model) and rec["seconds"] > 0
    assert set(rec["tasks"]) == {"pcb_cloze", "pcb_continuation"} and rec["limit"] == 20
    assert rec["samples"] == {"pcb_cloze": 20, "pcb_continuation": 20}
    assert math.isfinite(rec["average"]) and rec["suite"] == str(suite)
    assert {r["id"]: r["eval"] for r in store.records()} == {"pc-0": None, "eval-0": rec}
