"""Quiet logs: third-party progress bars off, so that pcbench's own lines (and, on a terminal, its
one bar per run) are what a log holds.

`third_party_bars()` runs first thing in every process pcbench starts (`pcbench` itself, a job of
the local or SLURM executor): it sets the libraries' own switches in the environment, so the
processes it starts inherit them, and tells the libraries already imported. transformers
(`Loading weights`, `Writing model shards`), huggingface_hub (downloads) and datasets (`Map`) are
off everywhere; off a terminal tqdm's default is off too (`TQDM_DISABLE`: lm-eval's and any other
library's bars) and `lm_eval_quiet()` silences the bars lm-eval asks for explicitly. A variable
the user set is kept as it is. pcbench's own bar passes `disable=` itself and is unaffected.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

EVERYWHERE = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
OFF_TERMINAL = {"TQDM_DISABLE": "1"}


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def third_party_bars(tty: Optional[bool] = None) -> None:
    """Turn the third-party progress bars off in this process and the processes it starts."""
    tty = on_terminal() if tty is None else tty
    for k, v in {**EVERYWHERE, **({} if tty else OFF_TERMINAL)}.items():
        os.environ.setdefault(k, v)
    # libraries already imported read their variable at import: tell them (only if they are loaded)
    if "huggingface_hub" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()


@contextlib.contextmanager
def lm_eval_quiet() -> Iterator[None]:
    """While lm-eval scores: what it prints goes to stderr (`bootstrapping for stddev: ...`), so that
    stdout holds pcbench's own output (`pcbench eval`: one JSON document); off a terminal (or with
    TQDM_DISABLE set) its model bars, which pass `disable=` themselves, are off too."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        if os.environ.get("TQDM_DISABLE", "") not in ("", "0") or not on_terminal():
            from unittest import mock

            import tqdm

            def quiet(*args, **kwargs):
                return tqdm.tqdm(*args, **{**kwargs, "disable": True})

            for name in ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.metrics",
                         "lm_eval.api.task", "lm_eval.evaluator"):
                module = sys.modules.get(name)
                if module is not None and getattr(module, "tqdm", None) is tqdm.tqdm:
                    stack.enter_context(mock.patch.object(module, "tqdm", quiet))
        yield
