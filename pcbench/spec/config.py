"""Typed run specs and a strict YAML/dict loader: a bad field fails with its path and the reason.

A `RunSpec` is everything one training run needs (pretraining, HPR or PC); grids expand into
RunSpecs (see `grid.py`). Loading is strict: unknown keys (with a "did you mean" hint), missing
required keys, wrong types and out-of-range values raise `SpecError` naming the field path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pcbench import tracking
from pcbench.spec import methods, presets
from pcbench.util.errors import SpecError
from pcbench.util.suggest import did_you_mean


# Seeds reach numpy's legacy seeding (`np.random.seed`: 0 to 2**32 - 1) and `np.random.default_rng`
# (non-negative): a seed outside this range would fail only inside the job.
MAX_SEED = 2**32 - 1
# Any integer field reaches torch/numpy as a C long long at most: one past it fails there ("Overflow
# when unpacking long long", or a C++ stack trace) inside the job. Tighter bounds where torch counts
# in int32 or a value multiplies into tensor sizes: thread counts (torch spawns them), sizes (layers,
# widths, seq_len, batch rows, vocabulary padding) and a run's total tokens (sampled positions).
MAX_INT = 2**63 - 1
MAX_THREADS = 4096
MAX_SIZE = 2**20
MAX_TOKENS = 2**53  # float64 counts every token exactly
# A number quoted in YAML is read as one only when it is a plain decimal (`'1e-3'`, from a template);
# float() alone would read `'1_0'` as 10 and `' 1 '` as 1.
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def require(cond: bool, path: str, reason: str) -> None:
    """Raise `SpecError(path, reason)` unless `cond`."""
    if not cond:
        raise SpecError(path, reason)


def require_at_most(value: Optional[int], most: int, path: str) -> None:
    """Raise `SpecError` naming `path` when `value` (None: unset) is above `most`."""
    if value is not None and value > most:
        raise SpecError(path, f"must be at most {most:,}, got {value:,}")


# ---------------------------------------------------------------------------------------------
# Specs


@dataclass
class ModelSpec:
    """Which network. `name` is a preset (see `presets.PRESETS`); `path` loads pretrained weights."""

    name: str = "gpt2-tiny"
    path: Optional[str] = None  # HF checkpoint dir or hub id; required for presets without weights
    layers: Optional[int] = None
    d_model: Optional[int] = None
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    # From scratch: round the embedding and head up to a multiple of this many rows (64: GPT-2's
    # 50,257 -> 50,304, tensor-core tiles; nanoGPT). The tokenizer is unchanged; the extra rows are
    # never inputs or targets, and the export drops them (a stock model of the tokenizer's size).
    # 1: no padding (every committed CPU study)
    pad_vocab: int = 1

    def validate(self, path: str) -> None:
        require(self.name in presets.PRESETS, f"{path}.name",
                f"unknown model {self.name!r}; known: {', '.join(sorted(presets.PRESETS))}")
        for f in ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff"):
            v = getattr(self, f)
            require(v is None or v > 0, f"{path}.{f}", f"must be a positive integer, got {v}")
        require(self.pad_vocab >= 1, f"{path}.pad_vocab", f"must be a positive integer, got {self.pad_vocab}")
        for f in ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff", "pad_vocab"):
            require_at_most(getattr(self, f), MAX_SIZE, f"{path}.{f}")
        preset = presets.PRESETS[self.name]
        require(preset.weights != "path" or bool(self.path), f"{path}.path",
                f"model {self.name!r} needs a checkpoint path")
        if preset.weights == "path":
            return  # sizes come from the checkpoint
        heads = self.heads or preset.heads
        kv = self.kv_heads or preset.kv_heads or heads
        d = self.d_model or preset.d_model
        require(heads % kv == 0, f"{path}.kv_heads", f"heads ({heads}) must be a multiple of kv_heads ({kv})")
        require(d % heads == 0, f"{path}.d_model",
                f"d_model ({d}) must be a multiple of heads ({heads}) (transformers refuses other widths)")
        hd = self.head_dim or preset.head_dim or d // heads
        require(hd % 2 == 0, f"{path}.head_dim", f"RoPE needs an even head_dim, got {hd}")


@dataclass
class DataSpec:
    """Training corpus, tokenizer and sequence length; the held-out set for evaluation loss."""

    corpus: str = "books"
    tokenizer: str = "bpe-512"
    seq_len: int = 128
    eval_corpus: str = "sotu"
    eval_split: str = "test"
    eval_batches: int = 16
    max_tokens: Optional[int] = None  # an optional cap; a store's size comes from its runs (spec.stores)

    def token_stores(self, tokenizer: Optional[str] = None) -> dict[str, dict]:
        """The token stores a run reads, as `data.prepare_tokens` keyword arguments: "train" (the
        corpus's train split) and, with `eval_batches`, "eval" (the held-out split, tokenised with the
        same ids). `tokenizer`: the resolved name (default: this spec's; `model` resolves to the base
        checkpoint's, which only the job knows)."""
        tok = tokenizer or self.tokenizer
        out = {"train": dict(corpus=self.corpus, tokenizer=tok, split="train", max_tokens=self.max_tokens,
                             tokenizer_corpus=self.corpus)}
        if self.eval_batches > 0:
            out["eval"] = dict(corpus=self.eval_corpus, tokenizer=tok, split=self.eval_split,
                               max_tokens=self.max_tokens, tokenizer_corpus=self.corpus)
        return out

    def validate(self, path: str) -> None:
        from pcbench.data import corpora

        for name, split, f in ((self.corpus, "train", "corpus"), (self.eval_corpus, self.eval_split, "eval_corpus")):
            try:
                corpora.check_split(name, split)
            except ValueError as e:
                raise SpecError(f"{path}.{f}", str(e)) from None
        tok = self.tokenizer
        require(tok in ("gpt2", "llama3", "model") or re.fullmatch(r"bpe-\d+", tok) is not None
                or Path(tok).is_dir(), f"{path}.tokenizer",
                f"unknown tokenizer {tok!r}; use gpt2, llama3, bpe-<N>, model (the base checkpoint's) "
                "or a tokenizer directory")
        m = re.fullmatch(r"bpe-(\d+)", tok)
        require(m is None or int(m.group(1)) > 256, f"{path}.tokenizer", "a byte-level BPE needs more than 256 tokens")
        require(self.seq_len >= 8, f"{path}.seq_len", f"must be >= 8, got {self.seq_len}")
        require(self.eval_batches >= 0, f"{path}.eval_batches", "must be >= 0")
        require(self.max_tokens is None or self.max_tokens > 0, f"{path}.max_tokens", "must be positive")
        require_at_most(self.seq_len, MAX_SIZE, f"{path}.seq_len")
        require_at_most(self.max_tokens, MAX_TOKENS, f"{path}.max_tokens")


@dataclass
class OptimSpec:
    """AdamW with linear warm-up from `warmup_start`*lr and cosine decay to `final_lr`*lr."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup: float = 0.01  # fraction of steps (< 1) or a number of steps (>= 1)
    decay_norms: bool = False  # weight decay on vectors too (norms, biases), as the authors' code does
    warmup_start: float = 0.1
    final_lr: float = 0.1
    # global: clip the norm over everything trained; compressed (PC): clip the small network's
    # gradient before it is pushed into P/R, then each block's P/R gradient (pcbench.train.parallel.update)
    clip: Literal["global", "compressed"] = "global"

    def validate(self, path: str) -> None:
        require(self.lr > 0, f"{path}.lr", f"must be positive, got {self.lr}")
        require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{path}.beta1", "betas must be in [0, 1)")
        require(self.eps > 0, f"{path}.eps", f"must be positive, got {self.eps}")
        require(self.grad_clip >= 0, f"{path}.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.warmup >= 0, f"{path}.warmup", "must be >= 0")
        require(0 < self.warmup_start <= 1, f"{path}.warmup_start", "must be in (0, 1]")
        require(0 <= self.final_lr <= 1, f"{path}.final_lr", "must be in [0, 1]")


@dataclass
class TrainSpec:
    """How long and how: exactly one of `tokens`/`steps`; `batch_size` global rows per step."""

    tokens: Optional[int] = None
    steps: Optional[int] = None
    batch_size: int = 32
    micro_batch_size: Optional[int] = None  # rows per forward/backward per process; default all
    seed: int = 0
    data_seed: Optional[int] = None  # default: seed. Same data_seed -> same sequences in order
    log_every: int = 10
    eval_every: int = 0  # 0: held-out loss only at the end
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    threads: Optional[int] = None  # torch intra-op threads (CPU)
    device: str = "auto"  # auto | cpu | cuda
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # ddp: replicate; fsdp: FSDP2 (fully_shard) per decoder layer
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    last_k: int = 100  # the paper's metric: mean training loss over the last k steps
    # trackers the run streams to (`pcbench.tracking.TRACKERS`); where a run reports, not what it
    # computes: left out of its id (`identity: False`), so tracking never renames a run
    track: list[str] = field(default_factory=list, metadata={"identity": False})

    def validate(self, path: str) -> None:
        require((self.tokens is None) != (self.steps is None), path,
                "give exactly one of `tokens` and `steps`")
        require(self.tokens is None or self.tokens > 0, f"{path}.tokens", "must be positive")
        require(self.steps is None or self.steps >= 0, f"{path}.steps", "must be >= 0")
        require(self.batch_size > 0, f"{path}.batch_size", "must be positive")
        mb = self.micro_batch_size
        require(mb is None or (mb > 0 and self.batch_size % mb == 0), f"{path}.micro_batch_size",
                f"must divide batch_size ({self.batch_size}), got {mb}")
        require(self.log_every > 0, f"{path}.log_every", "must be positive")
        require(self.ckpt_every >= 0 and self.eval_every >= 0, f"{path}.ckpt_every", "must be >= 0")
        require(self.keep_checkpoints >= 1, f"{path}.keep_checkpoints", "must be >= 1")
        require(self.device in ("auto", "cpu", "cuda"), f"{path}.device", "auto, cpu or cuda")
        require(self.threads is None or self.threads > 0, f"{path}.threads", "must be positive")
        require(self.last_k > 0, f"{path}.last_k", "must be positive")
        require_at_most(self.threads, MAX_THREADS, f"{path}.threads")
        for f in ("batch_size", "micro_batch_size"):
            require_at_most(getattr(self, f), MAX_SIZE, f"{path}.{f}")
        require_at_most(self.tokens, MAX_TOKENS, f"{path}.tokens")
        require_at_most(self.steps, MAX_TOKENS, f"{path}.steps")
        for f in ("seed", "data_seed"):
            v = getattr(self, f)
            require(v is None or 0 <= v <= MAX_SEED, f"{path}.{f}", f"must be in [0, {MAX_SEED}], got {v}")
        for i, name in enumerate(self.track):
            require(name in tracking.TRACKERS, f"{path}.track[{i}]",
                    f"unknown tracker {name!r}; choose from {', '.join(tracking.TRACKERS)}")
        require(len(set(self.track)) == len(self.track), f"{path}.track", "a tracker is named twice")


@dataclass
class CompressSpec:
    """A base model compressed by a registered method (`pcbench.spec.methods.METHODS`: hard pruning with
    retraining `hpr`, Projected Compression `pc`, its autograd reference `pc-naive`)."""

    method: str = "pc"  # a name in pcbench.spec.methods.METHODS
    compression: float = 0.5  # share of ALL parameters removed (embeddings and head included)
    importance: Literal["magnitude", "activation", "random"] = "random"
    importance_seed: int = 0
    calibration_batches: int = 8
    sides: Literal["in", "out", "both"] = "both"
    residual: bool = True
    distill: float = 0.0  # alpha of (1-a)*CE + a*T^2*KL(teacher||student); 0 = off
    temperature: float = 1.0
    align: int = 1  # round the compressed d_model / d_ff to a multiple of this
    base_dtype: Literal["float32", "bfloat16"] = "float32"  # PC: storage of the frozen base
    base_device: Literal["auto", "cpu"] = "auto"  # PC: keep the frozen base on CPU
    decay_projections: bool = True  # PC: apply weight decay to P and R
    recovery_every: int = 10  # PC: log P mass on pruned dimensions every N steps
    blockwise_step: bool = False  # PC: push and step P/R block by block (decoder layer, embedding, head)
    # PC: the products of each two-sided tensor's materialise + push: "autograd" (those of autograd's
    # backward, so fp32 training is bitwise the autograd-recompute path's) or "flops" (the fewest
    # FLOPs: the same gradients up to float rounding; 8% fewer on the step-cost Llama cell's FFN)
    order: Literal["autograd", "flops"] = "autograd"
    # PC: the matmuls of the fixed part (materialise, push): fp32; tf32 (TF32 tensor cores on CUDA, the
    # same as fp32 on CPU); bf16 (bf16 operands, fp32 accumulation and results). P, R, their gradients
    # and W_c stay fp32. auto: fp32 on CPU (committed CPU studies bitwise), tf32 on CUDA
    # (tests/test_fixed_precision.py measures each against float64)
    fixed_precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"

    def validate(self, path: str) -> None:
        require(self.method in methods.METHODS, f"{path}.method", methods.unknown(self.method))
        require(0 < self.compression < 1, f"{path}.compression",
                f"must be a fraction in (0, 1), got {self.compression}")
        require(0 <= self.distill <= 1, f"{path}.distill", f"alpha must be in [0, 1], got {self.distill}")
        require(self.temperature > 0, f"{path}.temperature", "must be positive")
        require(self.align >= 1, f"{path}.align", "must be >= 1")
        require(self.calibration_batches >= 1, f"{path}.calibration_batches", "must be >= 1")
        require(self.recovery_every >= 0, f"{path}.recovery_every", "must be >= 0")
        require_at_most(self.align, MAX_SIZE, f"{path}.align")
        require(0 <= self.importance_seed <= MAX_SEED, f"{path}.importance_seed",
                f"must be in [0, {MAX_SEED}], got {self.importance_seed}")


@dataclass
class RunSpec:
    """One training run. `compress` absent: pretraining from scratch, or fine-tuning every weight when
    the model has a checkpoint (`model.path`); present: HPR or PC of that checkpoint."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=100))
    compress: Optional[CompressSpec] = None

    @property
    def kind(self) -> str:
        """pretrain (from scratch), finetune (all weights of a checkpoint), hpr or pc."""
        if self.compress is not None:
            return self.compress.method
        return "finetune" if self.model.path or presets.has_weights(self.model.name) else "pretrain"

    def validate(self, path: str = "spec") -> None:
        self.model.validate(f"{path}.model")
        self.data.validate(f"{path}.data")
        self.optim.validate(f"{path}.optim")
        self.train.validate(f"{path}.train")
        if self.train.steps is not None:  # the tokens a run reads: steps x rows x positions
            n = self.train.steps * self.train.batch_size * self.data.seq_len
            require(n <= MAX_TOKENS, f"{path}.train.steps",
                    f"{n:,} tokens (steps x batch_size x seq_len); at most {MAX_TOKENS:,}")
        batch = self.train.batch_size * (self.data.seq_len + 1)  # one batch of windows
        require(self.data.max_tokens is None or self.data.max_tokens >= batch, f"{path}.data.max_tokens",
                f"{self.data.max_tokens:,} tokens hold less than one batch: train.batch_size x (data.seq_len + 1) = "
                f"{batch:,}" if self.data.max_tokens else "")
        if self.compress is not None:
            self.compress.validate(f"{path}.compress")
            require(self.model.path is not None or presets.has_weights(self.model.name),
                    f"{path}.model.path", "compression needs a pretrained base: give a checkpoint path")
        m = methods.METHODS[self.compress.method] if self.compress is not None else None
        pc = m is not None and m.push  # P/R gradients by one closed-form push per step
        require(m is None or pc or not m.projected or self.train.parallel != "fsdp", f"{path}.train.parallel",
                f"method {m.name if m else ''!r} runs on one process or ddp, not fsdp")
        require(self.optim.clip == "global" or pc, f"{path}.optim.clip",
                "`compressed` clips the small network of Projected Compression; use it with compress.method: pc")
        if self.compress is not None and self.compress.blockwise_step:
            require(pc, f"{path}.compress.blockwise_step", "only Projected Compression (method: pc) steps block-wise")
            require(self.optim.clip == "compressed" or self.optim.grad_clip == 0, f"{path}.compress.blockwise_step",
                    "a global norm needs every gradient at once: use optim.clip: compressed or optim.grad_clip: 0")


@dataclass
class EvalSpec:
    """Downstream scoring of a checkpoint with lm-eval (`model`: a directory or `run:<id>`)."""

    model: str
    tasks: list[str] = field(default_factory=lambda: ["pcb_cloze", "pcb_continuation"])
    num_fewshot: int = 0
    batch_size: int = 16
    limit: Optional[int] = None
    device: str = "auto"
    include_path: Optional[str] = None  # extra lm-eval task YAMLs; the local suite is always added
    threads: Optional[int] = None  # torch CPU threads while scoring (None: torch's default)

    def validate(self, path: str = "spec") -> None:
        require(bool(self.tasks), f"{path}.tasks", "give at least one task")
        require(self.batch_size > 0, f"{path}.batch_size", "must be positive")
        require(self.limit is None or self.limit > 0, f"{path}.limit", "must be positive")
        require(self.num_fewshot >= 0, f"{path}.num_fewshot", "must be >= 0")
        require(self.device in ("auto", "cpu", "cuda"), f"{path}.device", "auto, cpu or cuda")
        require(self.threads is None or self.threads > 0, f"{path}.threads", "must be positive")
        require_at_most(self.threads, MAX_THREADS, f"{path}.threads")
        require_at_most(self.batch_size, MAX_SIZE, f"{path}.batch_size")


# ---------------------------------------------------------------------------------------------
# Strict loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` and `1.25e9` as floats (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping; a key given twice is an error naming the key and both lines (YAML would
    silently keep the last)."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]}, again on line {line})",
                    key_node.start_mark)
            seen[key] = line
        except TypeError:
            continue  # an unhashable key: SafeLoader reports it
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

# YAML 1.1 (PyYAML) reads `010` as octal 8, `0x10` as 16, `0b11` as 3 and `1:30` as 90 (base 60):
# numbers a user typed as something else. An integer is read only where its decimal reading is the
# same number (`007` is 7 both ways); the others are refused with the line they are on.
_DIGITS = re.compile(r"^[-+]?[0-9][0-9_]*$")


def _ambiguous(node: yaml.ScalarNode, reads_as: Any) -> yaml.constructor.ConstructorError:
    return yaml.constructor.ConstructorError(
        None, None, f"ambiguous number {node.value!r}: YAML 1.1 reads it as {reads_as!r} "
        f"(write a plain decimal, or quote it for a string)", node.start_mark)


def _strict_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = yaml.SafeLoader.construct_yaml_int(loader, node)
    if not (_DIGITS.match(node.value) and int(node.value.replace("_", ""), 10) == value):
        raise _ambiguous(node, value)
    return value


def _strict_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    if ":" in node.value:  # base 60
        raise _ambiguous(node, value)
    return value


_Loader.add_constructor("tag:yaml.org,2002:int", _strict_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _strict_float)
# A lone `=` (YAML 1.1's "value" key) is the string "=", not an unreadable tag.
_Loader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file (numbers in scientific notation are floats); errors name the file."""
    p = Path(path)
    if not p.exists():
        raise SpecError(str(p), "file not found")
    try:
        data = p.read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError(f"{p}:{line}", f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {col} "
                        "(save the file as UTF-8)") from None
    except OSError as e:
        raise SpecError(str(p), f"cannot read: {e.strerror or e}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise SpecError(where, f"invalid YAML: {what}") from None
    except OSError as e:
        raise SpecError(str(p), f"cannot read: {e.strerror or e}") from None



def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check/convert `value` against the annotation `tp`, raising SpecError with `path`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            require(type(None) in args, path, "must not be null")
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error, with its own path (spec.compress.order)
            return convert(options[0], value, path)
        errors = []
        for a in options:
            try:
                return convert(a, value, path)
            except SpecError as e:
                errors.append(e.reason)
        raise SpecError(path, "; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        require(value in choices, path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp is list:
        tp = list[Any]
        origin = list
    if origin in (list, tuple):
        require(isinstance(value, (list, tuple)), path, f"must be a list, got {type(value).__name__}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        require(isinstance(value, dict), path, f"must be a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        require(isinstance(value, bool), path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        require(isinstance(value, int) and not isinstance(value, bool), path,
                f"must be an integer, got {value!r}")
        require(-MAX_INT <= value <= MAX_INT, path, f"must be an integer within +-{MAX_INT} (64 bits), got {value}")
        return value
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value):
            value = float(value)  # a template's result ("1e-${k}"); a quoted plain decimal
        require(isinstance(value, (int, float)) and not isinstance(value, bool), path,
                f"must be a number, got {value!r}")
        require(math.isfinite(value), path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        require(isinstance(value, str), path, f"must be a string, got {value!r}")
        return value
    raise SpecError(path, f"unsupported field type {_type_name(tp)}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    """The resolved field types of a spec class (cached: resolving them compiles every annotation)."""
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: Any, path: str = "spec") -> Any:
    """Build dataclass `cls` from a mapping, strictly (unknown/missing/mistyped keys raise)."""
    if data is None:
        data = {}
    require(isinstance(data, dict), path, f"must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise SpecError(f"{path}.{key}", f"unknown field{did_you_mean(key, fields)}; valid: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], f"{path}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{path}.{name}", "required field is missing")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (for YAML/JSON), recursively."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _with_field(data: dict, dotted: str, value: Any) -> dict:
    """A copy of the mapping `data` with `dotted` (`optim.lr`) set to `value`, mappings made on the way."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return {**data, head: value}
    inner = data.get(head)
    return {**data, head: _with_field(inner if isinstance(inner, dict) else {}, rest, value)}


def load_spec(cls: type, source: str | Path | dict, path: str = "spec", fields: Optional[dict[str, Any]] = None) -> Any:
    """The one way a spec is made (grids, `train`, `compress`, `eval`): a `cls` from a YAML file or a
    mapping, with `fields` ({"optim.lr": 1e-3}) set over it, converted strictly and validated. A field
    left out takes its dataclass default, so each default exists once, here in the spec classes."""
    if isinstance(source, dict):
        data, where = source, path
    else:
        data, where = load_yaml(Path(source)), str(Path(source))
        require(data is not None, where, "empty spec (the file holds no fields; a spec is a mapping)")
    for dotted, value in (fields or {}).items():
        data = _with_field(data if isinstance(data, dict) else {}, dotted, value)
    spec = from_dict(cls, data, where)
    spec.validate(where)
    return spec


def load_run_spec(source: str | Path | dict, path: str = "spec") -> RunSpec:
    """Load and validate a RunSpec from a YAML file or a mapping."""
    return load_spec(RunSpec, source, path)


def _field(cls: type, dotted: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field `dotted` (`optim.lr`) of the spec class `cls` and its type."""
    head, _, rest = dotted.partition(".")
    f = next(f for f in dataclasses.fields(cls) if f.name == head)
    tp = _hints(cls)[head]
    if not rest:
        return f, tp
    inner = tp if dataclasses.is_dataclass(tp) else next(a for a in typing.get_args(tp) if dataclasses.is_dataclass(a))
    return _field(inner, rest)


def field_default(cls: type, dotted: str) -> Any:
    """The default of the field `dotted` of the spec class `cls` (its own dataclass's)."""
    f, _ = _field(cls, dotted)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_choices(cls: type, dotted: str) -> Optional[tuple]:
    """The values a `Literal` field `dotted` of `cls` takes; None for any other type."""
    _, tp = _field(cls, dotted)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None
