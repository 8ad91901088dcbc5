"""`model.pad_vocab`: a from-scratch model trains with its embedding and head rounded up to a
multiple (50,257 -> 50,304 at 64) and exports at the tokenizer's size, a stock checkpoint whose
logits on every real id are the padded model's bit for bit (so argmax and sampling over real ids
are unchanged). The default (1) pads nothing: every existing run and its id stay as they are."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pcbench import models
from pcbench.spec.config import ModelSpec, load_run_spec
from pcbench.train import memory
from pcbench.train.loop import RunPaths, train


def test_padded_sizes():
    assert models.padded_vocab(50257, 64) == 50304
    assert models.padded_vocab(50304, 64) == 50304
    assert models.padded_vocab(50257, 1) == 50257


@pytest.mark.parametrize("tied", [False, True])
def test_unpadded_export_gives_the_padded_logits_on_real_ids(tied, tmp_path):
    cfg = models.build_config(ModelSpec(name="llama-tiny"), models.padded_vocab(500, 64), 32)
    cfg.tie_word_embeddings = tied
    model = models.build_model(cfg, seed=0).eval()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        padded = model(input_ids=ids).logits
    assert padded.shape[-1] == 512
    models.unpad_vocab(model, 500)
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock transformers, no pcbench
    assert stock.config.vocab_size == 500 and stock.lm_head.weight.shape[0] == 500
    with torch.no_grad():
        logits = stock(input_ids=ids).logits
    assert torch.equal(logits, padded[..., :500])
    assert torch.equal(logits.argmax(-1), padded[..., :500].argmax(-1))
    if tied:
        assert stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()


def test_a_padded_run_trains_padded_and_exports_the_tokenizers_size(tmp_path):
    spec = load_run_spec({
        "model": {"name": "gpt2-nano", "pad_vocab": 96},  # bpe-512 -> 576 rows
        "data": {"corpus": "books", "tokenizer": "bpe-512", "seq_len": 16, "eval_batches": 1},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 0, "threads": 1, "device": "cpu"}})
    p = RunPaths(record=tmp_path / "record", work=tmp_path / "work", export=tmp_path / "model")
    rec = train(spec, p, progress=False)
    assert rec["vocab"] == {"tokenizer": 512, "padded": 576}
    assert json.loads((p.model / "config.json").read_text())["vocab_size"] == 512
    assert AutoModelForCausalLM.from_pretrained(p.model).lm_head.weight.shape[0] == 512
    # the plan: trained with 576 rows (logits), exported with 512 (what a compress stage reads)
    assert memory.model_config(spec)["vocab_size"] == 576
    assert memory.output_config(spec)["vocab_size"] == 512


def test_the_plan_counts_padded_logits():
    base = {"model": {"name": "gpt2-300m"}, "data": {"corpus": "books", "tokenizer": "gpt2", "seq_len": 512},
            "train": {"steps": 1, "batch_size": 8, "device": "cuda"}}
    plain = memory.plan(load_run_spec(base))
    base["model"]["pad_vocab"] = 64
    padded = memory.plan(load_run_spec(base))
    assert padded.components["logits"] * 50257 == plain.components["logits"] * 50304
