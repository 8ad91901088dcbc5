"""Evaluation: held-out loss of a network, and downstream scoring through lm-eval.

May import: `store`, `spec`, `data`, `util`. Imported by `train`, `run`, `cli`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pcbench.spec.config import EvalSpec, SpecError
from pcbench.util import quiet
from pcbench.util.devices import resolve_device
from pcbench.util.suggest import unknown_tasks

log = logging.getLogger(__name__)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision auto/bf16), nothing on CPU unless bf16 is asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def heldout_loss(model: nn.Module, batches, device: torch.device, precision: str = "auto") -> float:
    """Mean next-token cross-entropy over `batches` (token ids [rows, seq+1]); NaN if none."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            with autocast_for(device, precision):
                logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count if count else math.nan


# ---------------------------------------------------------------------------------------------
# Downstream scores through lm-eval

# Primary metric per task, the usual convention of zero-shot tables in pruning papers: length-
# normalised accuracy (acc_norm) for these multiple-choice tasks, plain accuracy for all others
# (sciq, social_iqa, winogrande, lambada_openai, and the local suite, whose continuation distractors
# are length-matched). eval.json keeps every metric, so a report can choose differently.
ACC_NORM_TASKS = frozenset({"hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"})
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "openbookqa", "piqa", "sciq",
               "social_iqa", "winogrande")  # the paper's zero-shot suite (lm-eval names; needs the hub)


def primary_metric(task: str, metrics: dict) -> Optional[str]:
    """`acc_norm` for ACC_NORM_TASKS, else `acc`; None if the task reports neither."""
    for name in (("acc_norm", "acc") if task in ACC_NORM_TASKS else ("acc",)):
        if metrics.get(name) is not None:
            return name
    return None


def hub_unavailable(timeout: float = 3.0) -> Optional[str]:
    """Why the Hugging Face hub cannot be used (offline mode, or no TCP connect in `timeout`), or None."""
    import socket
    from urllib.parse import urlparse

    import datasets
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return "in offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return None
    except OSError as e:
        return f"unreachable ({constants.ENDPOINT}: {e})"


@contextlib.contextmanager
def hub_offline(offline: bool = True):
    """Within: datasets / huggingface_hub / transformers never touch the network (cache only)."""
    import datasets
    from huggingface_hub import constants

    if not offline:
        yield
        return
    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _task_manager(tasks: list[str], include: list[str]):
    """A TaskManager over `include`, plus lm-eval's own tasks only if some task is not found there;
    also returns the tasks not found in `include` (they need lm-eval's task datasets)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include, include_defaults=False)
    hub = [t for t in tasks if t not in tm.all_tasks]
    if not hub:
        return tm, hub
    tm = TaskManager(include_path=include, include_defaults=True)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise SpecError("tasks", unknown_tasks(unknown, tm.all_tasks))
    return tm, hub


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None  # lm-eval writes "N/A" for a stderr it did not compute
    return float(v) if math.isfinite(v) else None


def _metrics(raw: dict) -> dict:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "alias": ...} -> {"acc": x, "acc_stderr": s}."""
    out = {}
    for key, value in raw.items():
        metric, sep, filt = key.partition(",")
        if not sep:
            continue  # alias, name, ...
        out[metric if filt == "none" else f"{metric},{filt}"] = _number(value)
    return out


def lm_eval_scores(spec: EvalSpec) -> dict:
    """Score the checkpoint directory `spec.model` on `spec.tasks` with lm-eval (HFLM).

    The local suite (`pcbench.data.tasks`) is always on the include path; lm-eval's own tasks are
    indexed only when a task is not local. Local-only runs never touch the hub; others fail with a
    clear error when a dataset must be downloaded and the hub is unreachable or offline mode is on.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from pcbench.data.tasks import build_tasks

    model = Path(spec.model).resolve()
    if not (model / "config.json").is_file():
        raise SpecError("model", f"{spec.model} is not a Hugging Face checkpoint directory (no config.json)")
    if not any((model / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise SpecError("model", f"{spec.model} has no tokenizer files (save the tokenizer next to the model)")
    from pcbench.util.hfdir import damage

    problem = damage(model)
    if problem:
        raise SpecError("model", problem)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    suite = build_tasks()
    include = [str(suite)] + ([spec.include_path] if spec.include_path else [])
    with _quiet_lm_eval(), _lean_lm_eval(), quiet.lm_eval_quiet():
        tm, hub = _task_manager(list(spec.tasks), include)
        why = hub_unavailable() if hub else None
        offline = not hub or why is not None
        device = str(resolve_device(spec.device, what="eval.device"))
        with hub_offline(offline):
            lm = HFLM(pretrained=str(model), tokenizer=str(model), batch_size=spec.batch_size, device=device)
            try:
                out = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot,
                                              limit=spec.limit, task_manager=tm, log_samples=False,
                                              bootstrap_iters=1000)
            except (ConnectionError, FileNotFoundError) as e:
                if not hub:
                    raise
                raise RuntimeError(
                    f"lm-eval could not load a dataset for task(s) among {', '.join(hub)}: {e}. "
                    f"Their datasets come from the Hugging Face hub, which is {why or 'not answering'} here, and are "
                    "not in the local datasets cache: run once where the hub is reachable "
                    "(or copy its datasets cache here), or use the local suite (pcb_cloze, pcb_continuation)."
                ) from e
    if out is None:
        raise RuntimeError("lm-eval returned no results (not the main process?)")
    groups = set(out.get("groups", {}))
    results = {t: _metrics(r) for t, r in out["results"].items()}
    leaves = {t: m for t, m in results.items() if t not in groups}
    primary = {t: primary_metric(t, m) for t, m in leaves.items()}
    scored = [leaves[t][p] for t, p in primary.items() if p is not None]
    return {
        "model": str(model),
        "tasks": leaves,
        "groups": {t: results[t] for t in sorted(groups)},
        "primary": primary,
        "average": sum(scored) / len(scored) if scored else None,
        "samples": {t: out.get("n-samples", {}).get(t, {}).get("effective") for t in leaves},
        "versions": {t: out.get("versions", {}).get(t) for t in leaves},
        "lm_eval_version": lm_eval.__version__,
        "limit": spec.limit,
        "num_fewshot": spec.num_fewshot,
        "batch_size": spec.batch_size,
        "device": device,
        "suite": str(suite),
    }


class _Drop(logging.Filter):
    """Drops lm-eval's per-request truncation warnings (counted) and its few-shot notices."""

    def __init__(self) -> None:
        super().__init__()
        self.truncated = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Combined length of context"):
            self.truncated += 1
            return False
        return not msg.startswith("Overwriting default num_fewshot")


@contextlib.contextmanager
def _lean_lm_eval():
    """Skip what lm-eval does per evaluation that pcbench neither needs nor records, without
    changing a score: its environment report (`pip list`, `nvidia-smi`, `git` in subprocesses:
    about 0.5 s per evaluation; the record names torch and lm-eval itself) and the process pool it
    starts for each bootstrapped standard error (`DISABLE_MULTIPROC`: the same draws, seeded alike,
    in this process; a pool forked from a job is slower than the draws and its workers' exit was
    printed as a traceback)."""
    from unittest import mock

    import lm_eval.evaluator

    saved = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with mock.patch.object(lm_eval.evaluator, "add_env_info", lambda results: None), \
                mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
            yield
    finally:
        if saved is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval, datasets and transformers log warnings and errors only; truncation is summarised."""
    import datasets
    import transformers

    root = logging.getLogger("lm_eval")
    noisy = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.evaluator")]
    level, drop = root.level, _Drop()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    tf_bars = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    root.setLevel(logging.WARNING)
    for lg in noisy:
        lg.addFilter(drop)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        root.setLevel(level)
        for lg in noisy:
            lg.removeFilter(drop)
        if bars:
            datasets.enable_progress_bars()
        if tf_bars:
            transformers.utils.logging.enable_progress_bar()
        transformers.logging.set_verbosity(verbosity)
        if drop.truncated:
            log.info("lm-eval cut the context of %d request(s) from the left to fit the model's window",
                     drop.truncated)


def run_eval(run: dict, store, inputs: Optional[dict] = None) -> dict:
    """Score a grid run of kind `eval` and write `eval.json` into its record directory.

    `run["spec"]` is an EvalSpec dict; a `run:<id>` model is that run's export. The record is
    `lm_eval_scores(...)` plus `parent` (the evaluated run's id, None for a plain directory),
    `seconds` (wall time of the scoring) and the caller's `inputs` ({parent: its export's digest},
    `run.stale.input_digests`).
    """
    from pcbench.util.atomic import write_json
    from pcbench.spec.config import from_dict
    from pcbench.store import parse_ref

    where = f"run {run['id']}.spec"
    spec = from_dict(EvalSpec, run["spec"], where)
    spec.validate(where)
    parent = parse_ref(spec.model)
    model = store.resolve_ref(spec.model, f"{where}.model")
    start = time.perf_counter()
    scores = lm_eval_scores(dataclasses.replace(spec, model=model))
    record = {**scores, "parent": parent, "seconds": time.perf_counter() - start,
              **({"inputs": inputs} if inputs else {})}
    write_json(store.run_dir(run["id"]) / "eval.json", record)
    return record
