"""Checks of everything knowable before the first job starts (`pcbench run`, `--dry-run`, `compress`).

Spec validation (`config.py`, `grid.py`) catches malformed fields; these checks need more than
the spec: lm-eval's task registry (an eval stage's task names), the file system (a `model.path`
that is a local path), the plan code (whether a compression level can be reached by the base's
widths: `compress.plan.achievable`) and the scheduler (`sbatch --test-only` of every distinct
job request, made with the same parameters submitit submits with). Each finds problems as
`SpecError`s (field path and reason, one line); the caller refuses to start when there are any.

What only a run can find stays at run time: e.g. an lm-eval hub task whose dataset is not
available offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from pcbench.spec.config import EvalSpec, ModelSpec, RunSpec, SpecError
from pcbench.store import is_ref, parse_ref
from pcbench.util.suggest import unknown_tasks


# ---------------------------------------------------------------------------------------------
# lm-eval task names


def lm_eval_task_names() -> set[str]:
    """Names lm-eval registers (tasks, groups, tags), indexed once per lm-eval version and cached
    (indexing reads ~15k YAMLs; no network)."""
    import lm_eval

    from pcbench.util.paths import cache_dir
    from pcbench.util.verify import Damaged, Unsealed, read_sealed_json, warn, write_sealed_json

    cache = cache_dir() / f"lm_eval_task_names-{lm_eval.__version__}.json"
    try:
        names = read_sealed_json(cache, "lm-eval task index")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return set(names)
    except (OSError, Unsealed):  # none yet, or an older pcbench's: indexed again
        pass
    except Damaged as e:
        warn(f"{e}; indexing lm-eval's tasks again")
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager(include_defaults=True).all_tasks)
    try:
        write_sealed_json(cache, names)
    except OSError:
        pass  # a read-only cache: indexed again next time
    return set(names)


def _include_task_names(include: Optional[str]) -> set[str]:
    if not include:
        return set()
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=include, include_defaults=False).all_tasks)


def check_tasks(tasks: list[str], include: Optional[str], field: str) -> None:
    """Every task is one of the local suite, the spec's include path or lm-eval's registry."""
    from pcbench.data.tasks import GROUP, TASKS

    known = {*TASKS, GROUP}
    rest = [t for t in tasks if t not in known]
    if include and rest:
        if not Path(include).is_dir():
            raise SpecError(f"{field[:field.rindex('.')]}.include_path", f"{include} is not a directory")
        known |= _include_task_names(include)
        rest = [t for t in rest if t not in known]
    if not rest:
        return
    registry = lm_eval_task_names()
    unknown = [t for t in rest if t not in registry]
    if unknown:
        raise SpecError(field, unknown_tasks(unknown, sorted(known | registry)))


# ---------------------------------------------------------------------------------------------
# Model paths


def _could_be_hub_id(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def check_model_dir(path: str, field: str, *, hub_ok: bool = True, tokenizer: bool = False) -> None:
    """`path` is a HF checkpoint directory (config.json; tokenizer files when `tokenizer`), or, when
    `hub_ok`, may be a hub id that transformers resolves from its cache at run time."""
    p = Path(path).expanduser()
    if not p.exists():
        if hub_ok and _could_be_hub_id(path):
            return
        raise SpecError(field, f"{path} does not exist (a checkpoint directory{' or hub id' if hub_ok else ''})")
    if not p.is_dir():
        raise SpecError(field, f"{path} is a file, not a checkpoint directory")
    if not (p / "config.json").is_file():
        raise SpecError(field, f"{path} holds no model (no config.json: not a Hugging Face checkpoint directory)")
    if tokenizer and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise SpecError(field, f"{path} has no tokenizer files (save the tokenizer next to the model)")
    problem = _damage(str(p.resolve()), tokenizer)
    if problem:
        raise SpecError(field, problem)


_DAMAGE: dict[tuple, Optional[str]] = {}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _damage(path: str, tokenizer: bool) -> Optional[str]:
    """What is wrong with a checkpoint directory, once per directory state (a grid names one base in
    many runs): `hfdir.damage` (every JSON file there parses, tokenizer's included, and each
    safetensors file is as long as its header says), then what loading it would refuse
    (`_load_problem`)."""
    from pcbench.util import hfdir

    try:
        state = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)))
    except OSError:
        state = None
    key = (path, tokenizer, state)
    if key not in _DAMAGE:
        _DAMAGE[key] = hfdir.damage(path, tokenizer=True) or _load_problem(Path(path), tokenizer)
    return _DAMAGE[key]


def _load_problem(p: Path, tokenizer: bool) -> Optional[str]:
    """What transformers would refuse loading checkpoint `p` whose JSON files parse: a config.json that
    is not a mapping with a model_type it knows, no weights file (or a shard its index names), and,
    when `tokenizer`, a tokenizer.json that is not a tokenizers serialization, or neither it nor a
    slow tokenizer's files."""
    config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    kind = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(kind, str) or not kind:
        return f"{p / 'config.json'}: not a model config (a mapping with a `model_type`)"
    if kind not in known_model_types():
        return f"{p / 'config.json'}: model_type {kind!r} is not one this transformers knows"
    names = [n for n in WEIGHTS if (p / n).is_file()]
    if not names:
        return f"{p}: no weights ({' or '.join(WEIGHTS[::2])}: missing)"
    if names[0].endswith(".index.json"):
        try:
            index = json.loads((p / names[0]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{p / names[0]}: damaged (not valid JSON)"
        shards = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
            return f"{p / names[0]}: not a weights index (no `weight_map`)"
        missing = sorted(v for v in set(shards.values()) if not (p / v).is_file())
        if missing:
            return f"{p / missing[0]}: missing (named by {names[0]})"
    return _tokenizer_problem(p) if tokenizer else None


def _tokenizer_problem(p: Path) -> Optional[str]:
    f = p / "tokenizer.json"
    if f.is_file():
        tok = json.loads(f.read_text(encoding="utf-8"))
        if not (isinstance(tok, dict) and isinstance(tok.get("model"), dict) and isinstance(tok.get("added_tokens"), list)):
            return f"{f}: damaged (not a tokenizers file: no `model` and `added_tokens`)"
        return None
    if (p / "tokenizer.model").is_file() or all((p / n).is_file() for n in ("vocab.json", "merges.txt")):
        return None
    return f"{f}: missing (and no slow tokenizer's files: vocab.json + merges.txt, or tokenizer.model)"


def known_model_types() -> set[str]:
    """The `model_type`s transformers' AutoConfig knows, kept on disk per version (`util.memo`):
    importing its table imports torch."""
    from pcbench.util.memo import remember

    def compute() -> list[str]:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        return sorted(CONFIG_MAPPING_NAMES)

    return set(remember("model-types", [], compute))


# ---------------------------------------------------------------------------------------------
# Compression levels


_META: dict[str, Any] = {}
_LEVELS: dict[tuple[str, int], list[float]] = {}


_CONFIG_KEYS: dict[int, tuple[Any, str]] = {}  # id(config) -> (config, its JSON): configs are shared
_CONFIGS: dict[tuple, Any] = {}


def _config_key(config) -> str:
    hit = _CONFIG_KEYS.get(id(config))
    if hit is None or hit[0] is not config:
        hit = _CONFIG_KEYS[id(config)] = (config, config.to_json_string(use_diff=False))
    return hit[1]


def _meta_model(config) -> Any:
    from pcbench import models

    key = _config_key(config)
    if key not in _META:
        _META[key] = models._meta_model(config)
    return _META[key]


def _levels(config, align: int) -> list[float]:
    """`plan.achievable` of a model of `config` (once per distinct config and align)."""
    from pcbench.compress.plan import achievable

    key = (_config_key(config), align)
    if key not in _LEVELS:
        _LEVELS[key] = achievable(_meta_model(config), align)
    return _LEVELS[key]


def base_config(model: ModelSpec, data_tokenizer: str, seq_len: int, runs: Optional[dict] = None):
    """The transformers config of the model a spec loads or builds, when knowable before any run
    (None otherwise: a `run:` of a compressed run, a hub model not in the cache). Read or built once
    per distinct model, tokenizer and length (a grid names the same base in many runs)."""
    import dataclasses

    if is_ref(model.path):
        parent = (runs or {}).get(parse_ref(model.path))
        if parent is None or not isinstance(parent.spec, RunSpec) or parent.spec.compress is not None:
            return None
        ps = parent.spec
        return base_config(ps.model, ps.data.tokenizer, ps.data.seq_len, runs)
    key = (json.dumps(dataclasses.asdict(model), sort_keys=True), data_tokenizer, seq_len, _dir_state(model.path))
    if key not in _CONFIGS:
        _CONFIGS[key] = _base_config(model, data_tokenizer, seq_len, runs)
    return _CONFIGS[key]


def _dir_state(path: Optional[str]) -> Any:
    try:
        return os.stat(Path(path) / "config.json").st_mtime_ns if path else None
    except OSError:
        return None


def _base_config(model: ModelSpec, data_tokenizer: str, seq_len: int, runs: Optional[dict] = None):
    from transformers import AutoConfig

    from pcbench import models

    path = model.path
    if is_ref(path):
        parent = (runs or {}).get(parse_ref(path))
        if parent is None or not isinstance(parent.spec, RunSpec) or parent.spec.compress is not None:
            return None
        ps = parent.spec
        return base_config(ps.model, ps.data.tokenizer, ps.data.seq_len, runs)
    if path:
        if (Path(path) / "config.json").is_file():
            return AutoConfig.from_pretrained(path)
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            return None
    preset = models.PRESETS[model.name]
    if preset.weights == "smollm2-gguf":
        from pcbench.util.paths import cache_dir

        cached = cache_dir() / "models" / "smollm2-135m"
        return AutoConfig.from_pretrained(cached) if (cached / "config.json").is_file() else None
    if preset.weights:
        try:
            return AutoConfig.from_pretrained(preset.weights[4:], local_files_only=True)
        except (OSError, ValueError):
            return None
    vocab = models.vocab_size_for(data_tokenizer)
    return None if vocab is None else models.build_config(model, vocab, seq_len)


def check_compression(config, compression: float, align: int, field: str) -> None:
    """`compression` can be reached by the plan code on a model of `config`, within half a step."""
    _check_levels(_levels(config, align), config.hidden_size, compression, field)


def _check_levels(levels: list[float], hidden_size: int, compression: float, field: str) -> None:
    desc = f"d_model {hidden_size}"
    if not levels:
        raise SpecError(field, f"this base ({desc}) cannot be compressed at all")
    nearest = min([0.0, *levels], key=lambda v: abs(v - compression))
    if nearest == 0.0:
        raise SpecError(field, f"{compression:g} is too small to remove anything from this base ({desc}): "
                        f"the smallest achievable level is {levels[0]:.3f}")
    top = levels[-1]
    slack = max(0.01, (top - levels[-2]) / 2 if len(levels) > 1 else 0.0)
    if compression > top + slack:
        near = ", ".join(f"{v:.3f}" for v in levels[-3:])
        raise SpecError(field, f"{compression:g} cannot be reached with this base ({desc}): the most a plan "
                        f"can remove is {top:.3f} (nearest achievable levels: {near})")


# ---------------------------------------------------------------------------------------------
# Grid runs


def check_run(run, runs: dict) -> None:
    """Everything about one run that is knowable before it starts."""
    spec = run.spec
    where = f"stages.{run.stage}.spec"
    if isinstance(spec, EvalSpec):
        if not is_ref(spec.model):
            check_model_dir(spec.model, f"{where}.model", hub_ok=False, tokenizer=True)
        check_tasks(list(spec.tasks), spec.include_path, f"{where}.tasks")
        return
    path = spec.model.path
    if path and not is_ref(path):
        check_model_dir(path, f"{where}.model.path", tokenizer=spec.data.tokenizer == "model")
    if spec.compress is not None:
        facts = _compression_facts(spec.model, spec.data.tokenizer, spec.data.seq_len, spec.compress.align, runs)
        if facts is not None:
            _check_levels(facts["levels"], facts["hidden_size"], spec.compress.compression,
                          f"{where}.compress.compression")


def _compression_facts(model: ModelSpec, data_tokenizer: str, seq_len: int, align: int,
                       runs: Optional[dict]) -> Optional[dict]:
    """{hidden_size, levels} of the base a spec compresses (None: unknown before the run). Kept on
    disk (`util.memo`) for a from-scratch preset or a local checkpoint, by what shapes the model,
    so a known base is checked without torch or transformers."""
    import dataclasses

    from pcbench.spec.presets import PRESETS, vocab_size_for
    from pcbench.util.memo import remember

    m, tok, length = model, data_tokenizer, seq_len
    while is_ref(m.path):  # a `run:` of a train run: the model that run starts from
        parent = (runs or {}).get(parse_ref(m.path))
        if parent is None or not isinstance(parent.spec, RunSpec) or parent.spec.compress is not None:
            return None
        m, tok, length = parent.spec.model, parent.spec.data.tokenizer, parent.spec.data.seq_len

    def compute() -> Optional[dict]:
        config = base_config(model, data_tokenizer, seq_len, runs)
        if config is None:
            return None
        return {"hidden_size": config.hidden_size, "levels": _levels(config, align)}

    if m.path:
        try:
            text = (Path(m.path).expanduser() / "config.json").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return compute()
        key = ["dir", text, align]
    elif not PRESETS[m.name].weights and vocab_size_for(tok) is not None:
        key = ["preset", dataclasses.asdict(m), vocab_size_for(tok), length, align]
    else:
        return compute()
    facts = remember("compression-levels", key, compute)
    return facts


def check_grid(grid, store, only: Optional[str], override: dict, executor: str) -> list[SpecError]:
    """Problems of the selected runs that are not completed yet (empty: fine to start)."""
    runs = grid.by_id()
    todo = [r for r in grid.select(only) if store.state(r.id) != "completed"]
    problems: list[SpecError] = []
    seen: set[str] = set()
    for run in todo:
        try:
            check_run(run, runs)
        except SpecError as e:
            if str(e) not in seen:  # one line per distinct problem, not per run
                seen.add(str(e))
                problems.append(e)
    if not problems:  # the executor's own checks (slurm: `sbatch --test-only` of each job request)
        from pcbench.run.executors import named

        problems += named(executor).preflight(todo, override)
    return problems

