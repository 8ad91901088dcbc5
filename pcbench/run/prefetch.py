"""Prepare the data a grid's local runs will read, in a background process, while the fork server
imports torch: on a cold cache the first run then finds its tokenizer, token stores and lm-eval
task suite built (or being built: the stores are locked, a job waits for the lock) instead of
building them after the imports.

`python -m pcbench.run.prefetch JSON` takes a list of needs (`needs(todo)`): `{"corpus", "tokenizer",
"split", "max_tokens", "tokenizer_corpus"}` per token store and `{"tasks": true}` for the local
suite. It is best effort: anything it cannot prepare is left to the job, which prepares it itself
(and reports what is wrong), so its own output is discarded.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pcbench.grid import Run

NAMED_TOKENIZERS = ("gpt2", "llama3")  # and bpe-<N>; "model" (a checkpoint's own) is the job's


def needs(todo: list[Run]) -> list[dict]:
    """What the runs in `todo` prepare before their first step, deduplicated, in first-use order."""
    out: list[dict] = []
    for run in todo:
        spec = run.spec
        if run.kind == "eval":
            if any(t.startswith("pcb_") or t == "pcbench_local" for t in getattr(spec, "tasks", [])):
                out.append({"tasks": True})
            continue
        # token stores: built before any job by the prepare stage (`run.prepare`), not here
    unique: list[dict] = []
    for n in out:
        if n not in unique:
            unique.append(n)
    return unique


def missing(items: list[dict]) -> list[dict]:
    """The needs not in the cache already, judged from the stores' and the suite's own records
    (torch-free; a store made with another tokenizer version counts as present: the job rebuilds)."""
    from pcbench.data import corpora
    from pcbench.util.paths import cache_dir

    metas = []
    for meta in (cache_dir() / "tokens").glob("*/meta.json"):
        try:
            metas.append(json.loads(meta.read_text()))
        except (OSError, ValueError):
            continue
    out = []
    for n in items:
        if n.get("tasks"):
            from pcbench.data.tasks import suite_key

            if not (cache_dir() / "lm_eval_tasks" / suite_key() / "suite.json").is_file():
                out.append(n)
            continue
        try:
            inputs = corpora.fingerprint(n["corpus"], n["split"])
        except Exception:  # noqa: BLE001 - a bad corpus is the job's error to report
            continue
        want = {**{k: n[k] for k in ("corpus", "split", "tokenizer", "tokenizer_corpus", "max_tokens")},
                "inputs_sha256": inputs}
        if not any(all(m.get(k) == v for k, v in want.items()) for m in metas):
            out.append(n)
    return out


def prepare(items: list[dict]) -> None:
    from pcbench.data.tokens import prepare_tokens

    for n in items:
        if n.get("tasks"):
            from pcbench.data.tasks import build_tasks

            build_tasks()
        else:
            prepare_tokens(**n)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the launcher's stop: temporary files removed
    prepare(json.loads(sys.argv[1]))
