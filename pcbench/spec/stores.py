"""The token stores a run reads, and how many tokens of each: a function of the run's spec alone.

A packaged corpus's store holds its whole split, and a run reads all of it (or its first
`data.max_tokens`), as before stores were sharded. A streamed corpus's store holds a prefix of
the stream; a run reads its own prefix: the windows its budget consumes (`train`: steps x
batch_size windows of seq_len + 1 tokens; `eval`: eval_batches x batch_size windows), capped by
`data.max_tokens` when given. A run's batches therefore never depend on what else its grid holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from pcbench.data import corpora
from pcbench.data.shards import StoreRef


@dataclass(frozen=True)
class RunStore:
    """One store of one run: which (`ref`), how many tokens it reads (`n_tokens`, None: all) and
    how many the store must hold for it (`need`, None: the whole split)."""

    role: str  # train | eval
    ref: StoreRef
    n_tokens: Optional[int]
    need: Optional[int]


def steps_of(spec) -> int:
    t = spec.train
    if t.steps is not None:
        return t.steps
    return math.ceil(t.tokens / (t.batch_size * spec.data.seq_len))


def run_stores(spec, tokenizer: Optional[str] = None) -> dict[str, RunStore]:
    """{"train": ..., "eval": ... (with data.eval_batches)} for a training run's spec; `tokenizer`:
    the resolved name (`model` resolves to a checkpoint's, which the caller knows)."""
    d = spec.data
    tok = tokenizer or d.tokenizer
    window = d.seq_len + 1
    out = {}
    roles = [("train", d.corpus, "train", steps_of(spec) * spec.train.batch_size * window)]
    if d.eval_batches > 0:
        roles.append(("eval", d.eval_corpus, d.eval_split, d.eval_batches * spec.train.batch_size * window))
    for role, corpus, split, budget in roles:
        ref = StoreRef(corpus, tok, split, d.corpus)
        if corpora.is_streaming(corpus):
            n = budget if d.max_tokens is None else min(budget, d.max_tokens)
            out[role] = RunStore(role, ref, n, n)
        else:
            out[role] = RunStore(role, ref, d.max_tokens, None)
    return out
