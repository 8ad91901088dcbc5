"""The memory plan: predicted peak bytes per process of one training run, from its spec alone.

`plan(spec, world)` needs no weights: the model's shapes come from its config (a checkpoint's
`config.json` read as JSON, the HF cache's copy, or the preset's shape), the parameter list from a
meta-device model of that config and the compression map (`compress/axes.py`), the compressed
widths from `compress.plan.target_widths` on that meta model (they depend on the config and the
level only). The arithmetic follows what the training loop allocates (`train.Stepper`,
`parallel.update`, `compress/projected.py`), fp32 parameters throughout:

- persistent: the network trained (the small one for HPR/PC), PC's P_out/P_in/R per projected
  matrix and its frozen base (in `compress.base_dtype`), AdamW's two fp32 states per optimised
  parameter, the teacher (distillation), DDP's gradient buckets (one fp32 copy of the gradients);
- per micro-batch: saved activations (per decoder layer and token: coefficients measured with
  saved-tensor hooks on stock Llama/Arcee under fp32 and bf16 autocast, exact to the byte; with
  activation checkpointing only each layer's input plus one layer's recompute), bf16 weight copies
  autocast keeps for the backward (the tied head's too), the logits and their gradient (fp32;
  under bf16 the bf16 logits, their gradient and one chunk in fp32: `train.loss`), often the peak,
  freed before clip and AdamW (`train.Stepper`), so the optimiser phase has none;
- the head's and the tied embedding's backward (autograd's engine, any device): the head's weight
  gradient [vocab, d] while the logits and their gradient live (tied, or added to .grad with
  accumulation), and, tied, three [vocab, d] fp32 gradients at once when the embedding's backward
  adds its own out of place (the peak of Llama-3.2-1B's shape at short sequences);
- transients of the step: PC's cached intermediates (P_out W or W P_in) from `before_step` to the
  push, the push of one tensor (its base in fp32, a product); under fsdp (`_row_sharded_step`) each
  rank keeps B_r (its rows of W P_in) per tensor with P_out from `before_step` to the push (where B
  is W, o_proj, W gathered whole), and one tensor at a time gathers P_in and B and reduce-scatters H
  and dP_in (W is gathered only where it is B);
  AdamW's temporary (fused on CUDA: none; CPU: two of the largest tensor) and, with
  block-wise stepping, one block's P/R gradients instead of all of them.

Under `ddp` every process holds everything; under `fsdp` parameters, gradients, optimiser states,
P/R and bases are divided by the world size (row shards), plus the gathered unit (two decoder
layers or the embedding/head at a time, and one unsharded unit gradient; with gradient
accumulation FSDP2 keeps unsharded gradients). The peak is the largest of the phases
(forward/backward, push, optimiser step). The bench (`pcbench bench memory`) compares it with
measured peaks. Sizes are bytes; "GB" in tables and messages means GiB (2^30 bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pcbench.spec import methods
from pcbench.spec.config import RunSpec, SpecError
from pcbench.grid import merged_resources
from pcbench.spec.presets import FAMILIES, PRESETS, padded_vocab, vocab_size_for
from pcbench.store import is_ref, parse_ref

GiB = 2 ** 30
FP32 = 4
# Room a GPU needs beyond the plan: CUDA context, NCCL buffers, caching-allocator fragmentation.
RESERVE_BYTES = int(1.5 * GiB)
RESERVE_FRACTION = 0.05
# What CUDA reports of an "N GB" card (`total_memory`): an 80 GB H100/A100 79.2 GiB (85.0e9 bytes),
# a 141 GB H200 139.6 GiB; the plan's needs are compared with this, not with N GiB.
USABLE_FRACTION = 0.99


def usable_bytes(gpu_mem_gb: float) -> int:
    """Bytes a card sold as `gpu_mem_gb` GB offers (`resources.gpu_mem_gb`, `--gpu-mem`)."""
    return int(gpu_mem_gb * GiB * USABLE_FRACTION)

Resolver = Callable[[str], RunSpec]  # run id -> that run's spec (`run:<id>` model paths)


class PlanUnavailable(ValueError):
    """The run's model shape cannot be known before it starts (e.g. an unknown tokenizer size)."""


# ---------------------------------------------------------------------------------------------
# Model shapes (no weights)


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PlanUnavailable(f"cannot read {path / 'config.json'}: {e}") from None


def _hub_config(repo: str) -> Optional[dict]:
    """The HF cache's config.json of `repo`, if cached (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json")
    except Exception:  # noqa: BLE001 - no hub library or a bad cache: fall back to the preset
        return None
    return json.loads(Path(hit).read_text()) if isinstance(hit, str) else None


def _preset_config(spec: RunSpec, exported: bool = False) -> dict:
    """A from-scratch (or shape-only hub preset) config as a dict: as trained (`model.pad_vocab`
    rows), or as exported (`exported`: the tokenizer's); built once per model, vocabulary and
    length (`util.memo`, so a known one needs no transformers)."""
    from pcbench.util.memo import remember

    preset = PRESETS[spec.model.name]
    vocab = preset.vocab or vocab_size_for(spec.data.tokenizer)
    if vocab is None:
        raise PlanUnavailable(f"vocabulary of tokenizer {spec.data.tokenizer!r} unknown before it is loaded")
    if not preset.vocab and not exported:
        vocab = padded_vocab(vocab, spec.model.pad_vocab)

    def build() -> dict:
        from pcbench import models

        cfg = models.build_config(spec.model, vocab, spec.data.seq_len).to_dict()
        cfg["tie_word_embeddings"] = preset.tied
        return cfg

    fast = (tuple(getattr(spec.model, f.name) for f in dataclasses.fields(spec.model)), vocab, spec.data.seq_len)
    if fast not in _PRESET_CONFIGS:  # a grid asks for the same few models thousands of times
        key = [dataclasses.asdict(spec.model), vocab, spec.data.seq_len, preset.tied]
        _PRESET_CONFIGS[fast] = remember("preset-config", key, build)
    return dict(_PRESET_CONFIGS[fast])  # callers set top-level widths on their copy; nested values are read only


_PRESET_CONFIGS: dict[tuple, dict] = {}


def model_config(spec: RunSpec, resolve: Optional[Resolver] = None, exported: bool = False) -> dict:
    """The config (as a dict) of the network a run starts from: the base it compresses, the
    checkpoint it fine-tunes, or the model it pretrains (`exported`: as its export holds it, i.e.
    without `model.pad_vocab`'s rows)."""
    path = spec.model.path
    if is_ref(path):
        if resolve is None:
            raise PlanUnavailable(f"model.path {path} names another run (plan it within its grid)")
        return output_config(resolve(parse_ref(path)), resolve)
    if path:
        p = Path(path)
        if p.is_dir():
            return _read_config(p)
        hit = _hub_config(path)
        if hit is None:
            raise PlanUnavailable(f"no config.json at {path} (neither a directory nor in the HF cache)")
        return hit
    preset = PRESETS[spec.model.name]
    if preset.weights and preset.weights.startswith("hub:"):
        return _hub_config(preset.weights[4:]) or _preset_config(spec, exported)
    if preset.weights:  # e.g. the packaged SmolLM2: its checkpoint once dequantised, else the shape
        try:
            from pcbench import models

            return _read_config(Path(models.pretrained_path(spec.model)))
        except Exception:  # noqa: BLE001
            return _preset_config(spec, exported)
    return _preset_config(spec, exported)


def output_config(spec: RunSpec, resolve: Optional[Resolver] = None) -> dict:
    """The config of the model a run exports (compressed runs: the base at the plan's widths)."""
    from pcbench.compress.axes import CONFIG_WIDTH

    cfg = dict(model_config(spec, resolve, exported=True))
    if spec.compress is not None:
        for kind, width in widths(cfg, spec.compress.compression, spec.compress.align).items():
            cfg[CONFIG_WIDTH[kind]] = width
    return cfg


def _key(cfg: dict) -> str:
    return json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=32)
def _meta_model(key: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(key)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@functools.lru_cache(maxsize=32)
def _tensors(key: str) -> tuple[tuple[str, tuple[int, ...], tuple], ...]:
    """(name, shape, axis keys per dim) of every (deduplicated) parameter (`util.memo`: a known
    config needs no torch)."""
    from pcbench.util.memo import remember

    def compute() -> list:
        from pcbench.compress.axes import tensor_axes

        model = _meta_model(key)
        axes = tensor_axes(model)
        return [(n, tuple(p.shape), axes[n].dims) for n, p in model.named_parameters()]

    return tuple((n, tuple(shape), tuple(dims)) for n, shape, dims in remember("tensors", key, compute))


@functools.lru_cache(maxsize=64)
def _widths(key: str, compression: float, align: int) -> tuple[tuple[str, int], ...]:
    from pcbench.util.memo import remember

    def compute() -> list:
        from pcbench.compress.plan import target_widths

        return sorted(target_widths(_meta_model(key), compression, align).items())

    return tuple((k, int(v)) for k, v in remember("widths", [key, compression, align], compute))


def widths(cfg: dict, compression: float, align: int = 1) -> dict[str, int]:
    """The plan's widths per axis kind (`d_model`, `d_ff`) for this config and level."""
    try:
        return dict(_widths(_key(cfg), compression, align))
    except ValueError as e:
        raise PlanUnavailable(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Tensors of a run


def _numel(shape) -> int:
    return math.prod(shape)


def _sharded(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's dim-0 shard (torch.chunk: ceil(rows / world) rows)."""
    if world <= 1 or not shape:
        return _numel(shape)
    return -(-shape[0] // world) * _numel(shape[1:])


@functools.lru_cache(maxsize=256)
def _small_shapes(key: str, w: tuple[tuple[str, int], ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape at widths `w`) of every parameter of the config `key`."""
    wd = dict(w)
    return tuple((n, _small_shape(s, d, wd)) for n, s, d in _tensors(key))


def _small_shape(shape, dims, w: dict[str, int]) -> tuple[int, ...]:
    from pcbench.compress.axes import axis_kind

    return tuple(n if k is None else w[axis_kind(k)] for n, k in zip(shape, dims))


def _block(name: str) -> str:
    m = re.match(r"(.*?\.(?:layers|h|blocks)\.\d+)\.", name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


@dataclass
class _Proj:
    """One projected matrix: its base shape, compressed shape and trained P_out/P_in/R."""

    name: str
    base: tuple[int, int]
    small: tuple[int, int]
    p_out: bool
    p_in: bool
    selected: bool  # a compressed dim without a projection: a fixed index selection (a copy)
    residual: bool

    def shapes(self) -> list[tuple[int, int]]:
        (n_out, n_in), (k_out, k_in) = self.base, self.small
        out = [(k_out, n_out)] if self.p_out else []
        out += [(n_in, k_in)] if self.p_in else []
        return out + ([(k_out, k_in)] if self.residual else [])

    def out_first(self, k_out: int) -> bool:
        (n_out, n_in), (_, k_in) = self.base, self.small
        return k_out * n_out * n_in + k_out * n_in * k_in <= n_out * n_in * k_in + k_out * n_out * k_in

    def mid(self, k_out: int) -> int:
        """Elements of the two-sided intermediate (P_out W or W P_in) for `k_out` output rows."""
        if not (self.p_out and self.p_in):
            return 0
        (n_out, n_in), (_, k_in) = self.base, self.small
        return k_out * n_in if self.out_first(k_out) else n_out * k_in


def _row_sharded_step(p: _Proj, world: int, base_bytes: int, fixed_bf16: bool) -> tuple[int, int]:
    """PC under fsdp (`parallel.RowShard`), one tensor on one rank: (bytes of B_r kept from
    `before_step` to the push, the largest transient of its materialisation or push). Materialise:
    P_in gathered, W_r in the products' dtype, B_r = W_r P_in, B gathered, W_c's rows (written in
    place; a temporary under bf16). Push: B gathered again (where B is W, o_proj: kept whole from
    the materialisation instead, nothing gathered); then H = P_out^T G (n_out x k_in),
    its reduce-scattered rows, W_r in the products' dtype and dP_in's partial sum (n_in x k_in).
    The gradients the products become (dP_out, dP_in's rows) are the projection gradients."""
    (n_out, n_in), (k_out, k_in) = p.base, p.small
    rows_w, rows_c = -(-n_out // world), -(-k_out // world)
    op = 2 if fixed_bf16 else FP32  # the base as a product operand
    cast = rows_w * n_in * op if base_bytes != op else 0
    out_side = p.p_out or k_out < n_out
    if p.p_in:  # the product, in bf16 where P_out reads it under bf16 precision
        b_bytes = 2 if fixed_bf16 and p.p_out else FP32
        b_made = rows_w * k_in * (FP32 + (b_bytes if b_bytes != FP32 else 0))
    else:  # W_r's selected columns (a copy) or W_r itself (a view), in the base's dtype
        b_bytes, b_made = base_bytes, rows_w * k_in * base_bytes if k_in < n_in else 0
    b_rows = rows_w * k_in * b_bytes if (p.p_in or k_in < n_in) else 0
    b_full = n_out * k_in * b_bytes + (n_out * k_in * op if not p.p_in and base_bytes != op else 0)
    p_in_full = n_in * k_in * FP32 if p.p_in else 0
    tmp_out = rows_c * k_in * FP32 if fixed_bf16 else 0
    if not out_side:  # W_c's rows are B_r: the product written in place (under bf16 via `tmp_out`)
        b_made = b_rows = b_full = 0
    mat = p_in_full + max((cast if p.p_in else 0) + b_made, b_rows + b_full) + tmp_out
    push = b_full if p.p_out else 0
    if p.p_out and not p.p_in and k_in == n_in:  # B is W: gathered once, kept whole in the base's dtype
        return n_out * k_in * base_bytes, max(mat, n_out * k_in * op if base_bytes != op else 0)
    if p.p_in:
        h = (n_out + rows_w) * k_in * FP32 if out_side else 0
        push = max(push, h, (rows_w * k_in * FP32 if out_side else 0) + cast + n_in * k_in * FP32)
    return (b_rows if p.p_out else 0), max(mat, push)


def _projections(tensors, w: dict[str, int], sides: str, residual: bool) -> list[_Proj]:
    """PC's projected matrices, as `compress.projected.Projected` builds them."""
    out = []
    for name, shape, dims in tensors:
        if len(shape) != 2 or all(k is None for k in dims):
            continue
        both = all(k is not None for k in dims)
        p_out = dims[0] is not None and (not both or sides in ("out", "both"))
        p_in = dims[1] is not None and (not both or sides in ("in", "both"))
        out.append(_Proj(name, shape, _small_shape(shape, dims, w), p_out, p_in, both and not (p_out and p_in),
                         residual))
    return out


# ---------------------------------------------------------------------------------------------
# Activations per token (bytes), measured with saved-tensor hooks (tests/test_memory.py checks them)

# (per layer: d, d_ff, q width, kv width, heads, 1; outside the layers: d, 1)
_ACT = {
    ("gated", "fp32"): ((24, 16, 8, 8, 4, 8), (12, 12)),
    ("gated", "bf16"): ((26, 8, 4, 4, 4, 8), (10, 12)),
    ("plain", "fp32"): ((24, 4, 8, 8, 4, 8), (12, 12)),
    ("plain", "bf16"): ((24, 2, 4, 4, 4, 8), (10, 12)),
}
_PLAIN_MLP = {f.model_type for f in FAMILIES.values() if not f.gated}  # ungated up/down; others gated
# Logits [tokens, vocab] during the loss backward of `F.cross_entropy` on fp32 logits: the kept
# logits, log_softmax's saved output, its gradient and the gradient of its input (fp32; with a
# teacher under autocast the kept logits are bf16 and the rest fp32: 14).
_LOGIT_BYTES = {"fp32": 16, "bf16": 14}


def logits_bytes(tokens: int, vocab: int, precision: str, distill: bool = False) -> int:
    """Bytes the loss keeps of one micro-batch's logits at its peak: fp32 (and distillation) as
    `_LOGIT_BYTES`; bf16 without a teacher (`train.loss`, chunked): the bf16 logits and their bf16
    gradient plus one chunk's fp32 temporaries."""
    if precision == "fp32" or distill:
        return tokens * vocab * _LOGIT_BYTES[precision]
    from pcbench.train import loss

    return tokens * vocab * 4 + loss.CHUNK_TEMPORARIES * min(tokens, loss.chunk_rows(vocab)) * vocab * FP32
# Logits when the head's backward runs (the loss's temporaries freed): the kept logits and their
# gradient (fp32; under autocast both bf16). The head's weight gradient then made: fp32, and under
# autocast also its bf16 form, cast to fp32 for the fp32 weight.
_HEAD_LOGIT_BYTES = {"fp32": 8, "bf16": 4}
_HEAD_GRAD_BYTES = {"fp32": FP32, "bf16": FP32 + 2}


def _shape_facts(cfg: dict) -> dict:
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return {"d": cfg["hidden_size"], "f": cfg["intermediate_size"], "layers": cfg["num_hidden_layers"],
            "heads": heads, "kv": cfg.get("num_key_value_heads") or heads, "hd": hd, "vocab": cfg["vocab_size"]}


def activation_bytes(cfg: dict, tokens: int, precision: str, checkpointing: bool = False) -> dict[str, int]:
    """Saved activations of one micro-batch of `tokens` tokens through a network of config `cfg`:
    {per_layer, layers (all), outside (embedding ids, final norm, RoPE tables)}; checkpointing keeps
    each layer's fp32 input and recomputes one layer at a time."""
    s = _shape_facts(cfg)
    kind = "plain" if cfg.get("model_type") in _PLAIN_MLP else "gated"
    (cd, cf, cq, ckv, ch, c1), (od, o1) = _ACT[(kind, precision)]
    per_layer = tokens * (cd * s["d"] + cf * s["f"] + cq * s["heads"] * s["hd"] + ckv * s["kv"] * s["hd"]
                          + ch * s["heads"] + c1)
    layers = (s["layers"] * tokens * s["d"] * FP32 + per_layer) if checkpointing else s["layers"] * per_layer
    return {"per_layer": per_layer, "layers": layers, "outside": tokens * (od * s["d"] + o1)}


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    """Predicted bytes per process: `components`, the `phases` they add up to, and the `peak`."""

    kind: str
    world: int
    parallel: str
    device: str
    precision: str
    micro_batch: int
    accumulation: int
    activation_checkpointing: bool
    blockwise: bool
    components: dict[str, int]
    phases: dict[str, int]
    peak: int
    peak_phase: str
    persistent: int

    @property
    def gb(self) -> float:
        return self.peak / GiB

    def needs(self) -> int:
        """GPU memory the run needs: the peak plus the runtime's reserve."""
        return int(self.peak * (1 + RESERVE_FRACTION) + RESERVE_BYTES)

    def fits(self, gpu_mem_gb: float) -> bool:
        return self.needs() <= usable_bytes(gpu_mem_gb)

    def setting(self) -> str:
        gpus = f"{self.world} GPU{'s' if self.world > 1 else ''}"
        bits = [f"{self.parallel} on {gpus}", f"micro-batch {self.micro_batch}"]
        if self.activation_checkpointing:
            bits.append("activation checkpointing")
        if self.blockwise:
            bits.append("block-wise stepping")
        return ", ".join(bits)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak, "peak_gb": round(self.gb, 3), "peak_phase": self.peak_phase,
                "persistent_bytes": self.persistent, "needs_bytes": self.needs(), "kind": self.kind,
                "world_size": self.world, "parallel": self.parallel, "device": self.device,
                "precision": self.precision, "micro_batch": self.micro_batch, "accumulation": self.accumulation,
                "activation_checkpointing": self.activation_checkpointing, "blockwise_step": self.blockwise,
                "components": dict(self.components), "phases": dict(self.phases)}


def _precision(spec: RunSpec, device: str) -> str:
    p = spec.train.precision
    return "bf16" if p == "bf16" or (p == "auto" and device == "cuda") else "fp32"


def _device(spec: RunSpec, device: Optional[str]) -> str:
    if device:
        return device
    return "cuda" if spec.train.device == "cuda" else "cpu"


def plan(spec: RunSpec, world: int = 1, *, resolve: Optional[Resolver] = None, device: Optional[str] = None,
         parallel: Optional[str] = None, activation_checkpointing: Optional[bool] = None,
         micro_batch: Optional[int] = None, blockwise: Optional[bool] = None) -> MemoryPlan:
    """The memory plan of `spec` on `world` processes (keywords override the spec's settings)."""
    tc, c = spec.train, spec.compress
    dev = _device(spec, device)
    prec = _precision(spec, dev)
    par = parallel or tc.parallel
    ckpt = tc.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    pc = c is not None and methods.METHODS[c.method].projected  # P/R and frozen bases are held
    naive = pc and not methods.METHODS[c.method].push  # autograd through P.W.P in every micro-batch
    block = pc and (c.blockwise_step if blockwise is None else blockwise)
    if tc.batch_size % world:
        raise PlanUnavailable(f"batch_size {tc.batch_size} does not split over {world} processes")
    rows = tc.batch_size // world
    micro = min(micro_batch or tc.micro_batch_size or rows, rows)
    accum = max(1, rows // micro)
    sh = world if par == "fsdp" else 1  # shard divisor

    cfg = model_config(spec, resolve)
    key = _key(cfg)
    tensors = _tensors(key)
    w = widths(cfg, c.compression, c.align) if c is not None else None
    small = list(_small_shapes(key, tuple(sorted(w.items()))) if w else [(n, s) for n, s, _ in tensors])
    net_cfg = dict(cfg)
    if w:
        from pcbench.compress.axes import CONFIG_WIDTH

        net_cfg.update({CONFIG_WIDTH[k]: v for k, v in w.items()})
    numel = {n: _numel(s) for n, s in small}
    shard = {n: _sharded(s, sh) for n, s in small}
    net_n = sum(shard.values())
    comp: dict[str, int] = {"network": net_n * FP32}

    projs = _projections(tensors, w, c.sides, c.residual) if pc else []
    projected = {p.name for p in projs}
    base_bytes = 2 if pc and c.base_dtype == "bfloat16" else FP32
    pr_shapes = [s for p in projs for s in p.shapes()]
    pr_n = sum(_sharded(s, sh) for s in pr_shapes)
    direct = [n for n, _ in small if n not in projected]
    direct_n = sum(shard[n] for n in direct)
    optimised_n = pr_n + direct_n if pc else net_n
    if pc:
        comp["projections"] = pr_n * FP32
        comp["frozen_base"] = sum(_sharded(p.base, sh) for p in projs) * base_bytes
    base_full = sum(_numel(s) for _, s, _ in tensors)
    if c is not None and c.distill > 0:
        comp["teacher"] = base_full * FP32  # the base as loaded (fp32), replicated
        if pc and base_bytes == FP32 and sh == 1:
            comp["frozen_base"] = 0  # the projected bases share the teacher's storage
    comp["optimizer"] = 2 * FP32 * optimised_n
    if world > 1 and par == "ddp":
        comp["ddp_buckets"] = FP32 * net_n  # DDP's flat gradient buckets beside param.grad
    persistent = sum(comp.values())

    # Gradients of the network during the micro-batches (FSDP2 keeps them unsharded to accumulate).
    grads_net = FP32 * (sum(numel.values()) if sh > 1 and accum > 1 else net_n)
    if naive:  # gradients reach P/R in the backward: the small network's own are the direct vectors'
        grads_net = FP32 * direct_n
    comp["network_gradients"] = grads_net
    if pc:
        comp["projection_gradients"] = pr_n * FP32

    # Activations of one micro-batch.
    tokens = micro * spec.data.seq_len
    act = activation_bytes(net_cfg, tokens, prec, ckpt)
    comp["activations"] = act["layers"] + act["outside"]
    vocab = net_cfg["vocab_size"]
    distill = c is not None and c.distill > 0
    logits = logits_bytes(tokens, vocab, prec, distill)
    if distill:
        logits += tokens * vocab * ((2 if prec == "bf16" else FP32) + 2 * FP32)
    comp["logits"] = logits
    matrices = sum(numel[n] for n, s in small if len(s) == 2 and "embed" not in n)
    if net_cfg.get("tie_word_embeddings"):  # the tied head is the embedding: autocast copies it for the head
        matrices += sum(numel[n] for n, s in small if len(s) == 2 and "embed" in n)
    comp["autocast_copies"] = 2 * matrices if prec == "bf16" else 0

    # FSDP2: the gathered units (current + prefetched) and one unit's unsharded gradient.
    gathered = 0
    if sh > 1:
        units: dict[str, int] = {}
        for n, s in small:
            units[_block(n)] = units.get(_block(n), 0) + _numel(s)
        biggest = max(units.values())
        gathered = FP32 * (2 * biggest + (biggest if accum == 1 else 0))
        comp["fsdp_gathered"] = gathered

    # PC's step: cached intermediates, the push of one tensor. pc-naive instead keeps, through every
    # micro-batch, what autograd saves of each W_c's products (the two-sided intermediate, a selected
    # copy of W) and W_c itself (the forward's weights), and accumulates P/R's gradients as it goes.
    cache = push_t = 0
    if naive:
        graph = 0
        for p in projs:
            (n_out, n_in), (k_out, k_in) = p.base, p.small
            cache += p.mid(k_out) * FP32
            if p.selected or base_bytes != FP32:  # W selected (or cast) is a new tensor the product saves
                graph += (k_out if not p.p_out else n_out) * (k_in if not p.p_in else n_in) * FP32
            graph += k_out * k_in * FP32
        comp["step_cache"] = cache
        comp["graph_weights"] = graph
        cache += graph + pr_n * FP32  # held during the micro-batches (the phase sums `cache`)
    elif pc and sh > 1:
        fixed_bf16 = c.fixed_precision == "bf16"
        for p in projs:
            kept, transient = _row_sharded_step(p, sh, base_bytes, fixed_bf16)
            cache += kept
            push_t = max(push_t, transient)
        comp["step_cache"] = cache
        comp["push_transient"] = push_t
    elif pc:
        for p in projs:
            k_out = -(-p.small[0] // sh)  # this rank's rows of W_c
            mid = p.mid(k_out) * FP32
            cache += mid
            (n_out, n_in), (_, k_in) = p.base, p.small
            rows = k_out if p.selected and not p.p_out else n_out
            cols = k_in if p.selected and not p.p_in else n_in
            copy = rows * cols * FP32 if (base_bytes != FP32 or p.selected) else 0  # W in fp32 / selected
            push_t = max(push_t, copy + 2 * mid)  # the cached intermediate + one product
        comp["step_cache"] = cache
        comp["push_transient"] = push_t

    # AdamW's temporary: fused on CUDA (`loop.adamw_options`: one kernel, in place) none;
    # single-tensor (CPU) two of the largest.
    def opt_temp(names_shapes: list[tuple[int, ...]]) -> int:
        if not names_shapes or dev == "cuda":
            return 0
        return 2 * FP32 * max(_sharded(s, sh) for s in names_shapes)

    if pc:
        groups = [pr_shapes, [s for n, s in small if n in direct]]
        opt_t = max(opt_temp(g) for g in groups)
    else:
        mats = [s for n, s in small if len(s) >= 2]
        vecs = [s for n, s in small if len(s) < 2]
        opt_t = max(opt_temp(mats), opt_temp(vecs))
    comp["optimizer_transient"] = opt_t

    micro_phase = (persistent + grads_net + cache + act["layers"] + act["outside"] + logits
                   + comp["autocast_copies"] + gathered)
    phases = {"forward_backward": micro_phase}
    # The head's and the tied embedding's backward (autograd's engine, the same on every device).
    # The head's weight gradient [vocab, d] is a new tensor beside the others where it does not
    # simply become .grad: tied, autograd's input buffer holds it until the embedding's backward;
    # with accumulation it is added to .grad afterwards. At the tied embedding's backward the buffer
    # adds the embedding's own gradient out of place: three [vocab, d] fp32 tensors at once (the
    # sum becomes .grad on a single micro-batch; with accumulation it is added to .grad).
    tied = bool(net_cfg.get("tie_word_embeddings"))
    head_n = vocab * net_cfg["hidden_size"]
    if tied or accum > 1:
        comp["head_gradient"] = head_n * _HEAD_GRAD_BYTES[prec]
        phases["head_backward"] = (micro_phase - logits + tokens * vocab * _HEAD_LOGIT_BYTES[prec]
                                   + comp["head_gradient"])
    if tied:
        comp["tied_embedding_backward"] = (3 if accum > 1 else 2) * head_n * FP32
        phases["embedding_backward"] = persistent + grads_net + cache + gathered + comp["tied_embedding_backward"]
    if naive:
        phases["optimizer_step"] = persistent + pr_n * FP32 + FP32 * direct_n + opt_t
    elif pc and not block:
        # under fsdp every tensor's kept B_r is alive at the first push (and push_t leaves it out)
        phases["push"] = persistent + pr_n * FP32 + FP32 * direct_n + push_t + (cache if sh > 1 else 0)
        phases["optimizer_step"] = persistent + pr_n * FP32 + FP32 * direct_n + opt_t
    elif pc:
        by_block: dict[str, list[_Proj]] = {}
        for p in projs:
            by_block.setdefault(_block(p.name), []).append(p)
        worst = 0
        for ps in by_block.values():
            shapes = [s for p in ps for s in p.shapes()]
            g = FP32 * sum(_sharded(s, sh) for s in shapes)
            worst = max(worst, g + max(push_t, opt_temp(shapes)))
        comp["block_gradients_and_step"] = worst
        phases["blockwise_step"] = persistent + grads_net + cache + worst
    else:
        phases["optimizer_step"] = persistent + grads_net + opt_t
    peak_phase = max(phases, key=phases.get)
    return MemoryPlan(kind=spec.kind, world=world, parallel=par, device=dev, precision=prec, micro_batch=micro,
                      accumulation=accum, activation_checkpointing=ckpt, blockwise=block, components=comp,
                      phases=phases, peak=phases[peak_phase], peak_phase=peak_phase, persistent=persistent)


# ---------------------------------------------------------------------------------------------
# Fitting a GPU


def alternatives(spec: RunSpec, world: int, gpus_per_node: int, gpu_mem_gb: float, *,
                 resolve: Optional[Resolver] = None, max_nodes: int = 64) -> list[MemoryPlan]:
    """Plans of the same run that fit `gpu_mem_gb`: fsdp at this world size, more GPUs (fsdp, whole
    nodes), activation checkpointing, a smaller micro-batch; if none of these alone fits, the
    cheapest combination. Each found with `plan`."""
    base = plan(spec, world, resolve=resolve, device="cuda")
    per_node = max(1, gpus_per_node)
    out: list[MemoryPlan] = []

    def tryplan(w: int, **kw) -> Optional[MemoryPlan]:
        try:
            p = plan(spec, w, resolve=resolve, device="cuda", **kw)
        except PlanUnavailable:
            return None
        return p if p.fits(gpu_mem_gb) else None

    if base.parallel != "fsdp" and world > 1:
        out.append(tryplan(world, parallel="fsdp"))
    for nodes in range(max(1, -(-world // per_node)) + 1, max_nodes + 1):
        p = tryplan(nodes * per_node, parallel="fsdp")
        if p is not None:
            out.append(p)
            break
    if not base.activation_checkpointing:
        out.append(tryplan(world, activation_checkpointing=True))
    m = base.micro_batch // 2
    while m >= 1:
        if base.micro_batch % m == 0:
            p = tryplan(world, micro_batch=m)
            if p is not None:
                out.append(p)
                break
        m //= 2
    out = [p for p in out if p is not None]
    if not out:
        for nodes in range(max(1, -(-world // per_node)), max_nodes + 1):
            p = tryplan(nodes * per_node, parallel="fsdp", activation_checkpointing=True, micro_batch=1)
            if p is not None:
                return [p]
    return out


def refusal(run_id: str, spec: RunSpec, world: int, gpus_per_node: int, gpu_mem_gb: float, *,
            resolve: Optional[Resolver] = None) -> Optional[str]:
    """One line if the run's plan does not fit `gpu_mem_gb` per GPU (with what would), else None."""
    try:
        p = plan(spec, world, resolve=resolve, device="cuda")
    except PlanUnavailable:
        return None
    if p.fits(gpu_mem_gb):
        return None
    alts = alternatives(spec, world, gpus_per_node, gpu_mem_gb, resolve=resolve)
    fit = "; ".join(f"{a.setting()} ({a.needs() / GiB:.1f} GB)" for a in alts) or "nothing up to 64 nodes"
    return (f"{run_id} needs {p.needs() / GiB:.1f} GB per GPU (plan {p.gb:.1f} GB peak in {p.peak_phase} + "
            f"reserve) with {p.setting()}, more than the {gpu_mem_gb:g} GB asked (resources.gpu_mem_gb / "
            f"--gpu-mem); would fit: {fit}")


def grid_resolver(grid) -> Resolver:
    """`run:<id>` -> that run's spec, within `grid`."""
    runs = grid.by_id()
    return lambda rid: runs[rid].spec


def run_plan(run, res, resolve: Optional[Resolver] = None) -> Optional[MemoryPlan]:
    """A grid train run's plan per process at its resources (`grid.Resources`: world = nodes x
    tasks; on GPUs when it asks for any); None for eval runs and shapes unknown before the run."""
    if run.kind != "train":
        return None
    dev = "cuda" if res.gpus_per_node or run.spec.train.device == "cuda" else "cpu"
    try:
        return plan(run.spec, res.nodes * res.tasks, resolve=resolve, device=dev)
    except PlanUnavailable:
        return None


def over_limit(runs, resources_of: Callable, resolve: Optional[Resolver] = None) -> list[str]:
    """One refusal line per train run whose plan exceeds the GPU memory it asks for
    (`resources_of(run)`: its merged `grid.Resources`, `gpu_mem_gb` unset: no check)."""
    bad: list[str] = []
    for run in runs:
        r = resources_of(run)
        if run.kind != "train" or not getattr(r, "gpu_mem_gb", None):
            continue
        msg = refusal(run.id, run.spec, r.nodes * r.tasks, r.gpus_per_node, r.gpu_mem_gb, resolve=resolve)
        if msg:
            bad.append(msg)
    return bad


def check_submission(grid, decisions, override: dict) -> None:
    """Refuse (SpecError, one line) before anything is submitted if a run to submit does not fit
    the GPU memory it asks for (`resources.gpu_mem_gb` or `--gpu-mem`)."""
    todo = [d.run for d in decisions if d.action == "submit"]
    bad = over_limit(todo, lambda r: merged_resources(r, override), grid_resolver(grid))
    if bad:
        more = f" (and {len(bad) - 1} more run(s) over the limit)" if len(bad) > 1 else ""
        raise SpecError("resources.gpu_mem_gb", bad[0] + more)


def record_plan(spec: RunSpec, world: int, device: str) -> dict:
    """The plan as a run record holds it (`final.json: memory_plan`); a plan that cannot be made
    says why instead of failing the run."""
    try:
        return plan(spec, world, device="cuda" if device.startswith("cuda") else "cpu").to_dict()
    except Exception as e:  # noqa: BLE001 - a plan that cannot be made must not fail a finished run
        return {"error": f"{type(e).__name__}: {e}"}


def measured_peak(device) -> dict:
    """The process's measured peak: CUDA max_memory_allocated, else the peak RSS (VmHWM)."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_method": "torch.cuda.max_memory_allocated"}
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_memory_bytes": hwm, "peak_memory_method": "peak RSS (VmHWM) of the process"}


