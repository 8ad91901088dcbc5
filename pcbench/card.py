"""The model card of every exported model: `README.md` in Hugging Face's format (YAML metadata, then
markdown), written by `huggingface_hub.ModelCard`.

Metadata: `library_name: transformers`, `pipeline_tag: text-generation`, `tags` (`pcbench` and the
method), `base_model` where it is a Hub id (a hub preset, the packaged SmolLM2, a hub id given as
`model.path`), and `pcbench`: the run's numbers exactly as its final record holds them (method,
requested and achieved compression, parameters, widths, importance, retraining tokens and data,
final and held-out loss, pcbench version). The body shows them as a table, then the run's spec.
`add_scores` (called by `pcbench eval`) adds downstream scores: HF's `model-index` (`eval_results`),
`pcbench.scores` and a table in the body.

May import: `spec`, `util`, `pcbench` (no torch). Imported by `evaluate`, `train`, `cli`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from pcbench.spec import methods, presets

NAME = "README.md"
PACKAGED_HUB_IDS = {"smollm2-gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # models.PACKAGED_WEIGHTS' origins
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_SCORES = re.compile(r"\n## Downstream scores\n.*?(?=\n## |\Z)", re.S)


def base_model(spec: dict) -> Optional[str]:
    """The Hub id of the run's base checkpoint, or None where it is not one (a local directory,
    another run's export, a model trained from scratch)."""
    model = spec.get("model") or {}
    path = model.get("path")
    if path:
        if not str(path).startswith("run:") and not Path(path).exists() and _HUB_ID.fullmatch(str(path)):
            return str(path)
        return None
    p = presets.PRESETS.get(model.get("name", ""))
    if p is None or not p.weights:
        return None
    if p.weights.startswith("hub:"):
        return p.weights[4:]
    return PACKAGED_HUB_IDS.get(p.weights)


def facts(spec: dict, record: dict, name: Optional[str] = None) -> dict:
    """The card's `pcbench` metadata: the run's numbers as its final record holds them."""
    from pcbench import __version__

    comp = spec.get("compress") or {}
    plan = record.get("plan") or {}
    data, train = spec.get("data") or {}, spec.get("train") or {}
    out = {
        "run": name, "kind": record.get("kind"), "method": comp.get("method") or record.get("kind"),
        "compression_requested": comp.get("compression"), "compression_achieved": plan.get("achieved"),
        "params_before": plan.get("params_before"),
        "params_after": plan.get("params_after", ((record.get("model") or {}).get("params") or {}).get("total")),
        "widths": plan.get("widths"), "importance": comp.get("importance"),
        "importance_seed": comp.get("importance_seed") if comp else None,
        "base": (spec.get("model") or {}).get("path") or (spec.get("model") or {}).get("name"),
        "tokens": record.get("tokens"), "steps": record.get("steps"), "corpus": data.get("corpus"),
        "seed": train.get("seed"), "train_loss_last100": record.get("train_loss_last100"),
        "last_k": record.get("last_k"), "final_train_loss": record.get("final_train_loss"),
        "heldout_loss": record.get("heldout_loss"), "heldout_data": f"{data.get('eval_corpus')}/{data.get('eval_split')}",
        "pcbench": __version__,
    }
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items() if v is not None}


def _num(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.2f}%"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render(spec: dict, record: dict, name: Optional[str] = None) -> str:
    """The card's text (YAML metadata and markdown) for a run's export."""
    from huggingface_hub import ModelCard, ModelCardData

    f = facts(spec, record, name)
    method = f.get("method") or "model"
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         base_model=base_model(spec), tags=["pcbench", method], model_name=name or method,
                         pcbench=f)
    base = (record.get("base") or {})
    model = (record.get("model") or {})
    widths = ", ".join(f"{k} {base.get(k, '?')} -> {model.get(k, v)}" for k, v in (f.get("widths") or {}).items())
    doc = methods.METHODS[method].doc if method in methods.METHODS else ""
    if f.get("compression_requested") is not None:
        what = f"{methods.label(method)}, {100 * f['compression_requested']:g}% of all parameters removed"
    else:
        what = f"{method} (no compression)"
    rows = [
        ("method", f"{what}" + (f": {doc}" if doc else "")),
        ("base", f"`{f.get('base')}`" + (f" ({base_model(spec)})" if base_model(spec) else "")),
        ("requested compression", _num(f.get("compression_requested"), pct=True)),
        ("achieved compression", _num(f.get("compression_achieved"), pct=True)
         + (f" ({_num(f.get('params_before'))} -> {_num(f.get('params_after'))} parameters)"
            if f.get("params_before") else "")),
        ("widths", widths or "-"),
        ("importance", f"{f['importance']} (seed {f.get('importance_seed')})" if f.get("importance") else "-"),
        ("retraining", f"{_num(f.get('tokens'))} tokens of `{f.get('corpus')}` ({_num(f.get('steps'))} steps, "
                       f"seed {f.get('seed')})"),
        ("final train loss", f"{_num(f.get('train_loss_last100'))} (mean of the last {f.get('last_k')} steps; "
                             f"last step {_num(f.get('final_train_loss'))})"),
        ("held-out loss", f"{_num(f.get('heldout_loss'))} on `{f.get('heldout_data')}`"),
        ("pcbench", f["pcbench"]),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    title = f"{name}: " if name else ""
    body = (f"# {title}{what}\n\n"
            f"A stock Hugging Face checkpoint exported by pcbench (Projected "
            f"Compression vs hard pruning with retraining). Load it with "
            f"`AutoModelForCausalLM.from_pretrained(\"<this directory>\")`.\n\n{table}\n\n"
            f"## Run spec\n\nThe resolved spec the run trained with (`pcbench train` reads it):\n\n"
            f"```yaml\n{yaml.safe_dump(spec, sort_keys=True).rstrip()}\n```\n")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write(directory: Path, spec: dict, record: dict, name: Optional[str] = None) -> Path:
    """Write the card of a run's export into `directory` (a staging dir: the export's marker lists it)."""
    path = Path(directory) / NAME
    path.write_text(render(spec, record, name), encoding="utf-8")
    return path


def keep_users_card(staged: Path, target: Path) -> None:
    """A README.md the user put into an earlier pcbench model at `target` (not one of pcbench's own
    files there) is theirs: drop pcbench's card from the `staged` output instead of replacing it."""
    from pcbench.util import outputs

    target = Path(target)
    if (target / NAME).exists() and outputs.kind_of(target) == "model" and NAME not in outputs.own_files(target):
        (Path(staged) / NAME).unlink(missing_ok=True)


def add_scores(model_dir: str | Path, scores: dict) -> Optional[Path]:
    """Add the downstream `scores` (`evaluate.lm_eval_scores`) to the card of the pcbench model at
    `model_dir`: HF's `eval_results` (model-index), `pcbench.scores` and a table replacing any
    earlier one. Only a pcbench model output is written (a card listed in its marker); None else."""
    from huggingface_hub import EvalResult, ModelCard

    from pcbench.util import atomic, outputs

    d = Path(model_dir)
    if outputs.kind_of(d) != "model" or NAME not in outputs.own_files(d) or not (d / NAME).is_file():
        return None
    card = ModelCard.load(d / NAME)
    name = card.data.model_name or d.name
    primary = scores.get("primary") or {}
    results, rows, mine = [], [], {}
    for task, metrics in sorted((scores.get("tasks") or {}).items()):
        p = primary.get(task)
        if p is None or metrics.get(p) is None:
            continue
        mine[task] = {"metric": p, "value": metrics[p], "stderr": metrics.get(f"{p}_stderr")}
        results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                  metric_type=p, metric_value=metrics[p], task_name=task))
        rows.append(f"| {task} | {p} | {metrics[p]:.4f} |")
    card.data.model_name = name
    card.data.eval_results = results or None
    info = dict(card.data.get("pcbench") or {})
    info["scores"] = {"tasks": mine, "average": scores.get("average"), "num_fewshot": scores.get("num_fewshot"),
                      "limit": scores.get("limit"), "lm_eval": scores.get("lm_eval_version")}
    card.data.pcbench = info
    table = ("\n## Downstream scores\n\nScored by `pcbench eval` (lm-eval "
             f"{scores.get('lm_eval_version')}, {scores.get('num_fewshot', 0)}-shot"
             + (f", limit {scores['limit']}" if scores.get("limit") else "") + "):\n\n"
             + "\n".join(["| task | metric | value |", "|---|---|---|"] + rows)
             + (f"\n\nAverage: {scores['average']:.4f}" if scores.get("average") is not None else "") + "\n")
    text = _SCORES.sub("", card.text)
    at = text.find("\n## Run spec")
    text = text[:at] + table + text[at:] if at >= 0 else text + table
    new = str(ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}"))
    from pcbench.util.verify import sha256_bytes

    outputs.record_rewrite(d, NAME, sha256_bytes(new.encode("utf-8")))  # its marker knows the new card first
    atomic.write_text(d / NAME, new)
    return d / NAME


def read(model_dir: str | Path) -> dict:
    """The `pcbench` metadata of a model's card ({} when there is none)."""
    from huggingface_hub import ModelCard

    p = Path(model_dir) / NAME
    if not p.is_file():
        return {}
    return dict(ModelCard.load(p).data.get("pcbench") or {})
