"""Data parallelism for the one training loop: replicate (DDP) or shard (FSDP2), behind one interface.

`wrap(trainable, env, spec)` returns a `Replicated` (one process, or DDP) or a `Sharded` (torch's
FSDP2, `fully_shard`, DTensor) that the `Stepper` drives: `net` for the micro-batches, `sync(last)`
around each (gradients are reduced on the last), `before_step`, `push(keys)` (PC: the small
network's weight gradients into P/R), and `update` clips and steps. The loop asks it for `export()`
(a stock HF model on the main process) and `memory()` (bytes this process holds).

Under `Sharded` the small network is sharded per decoder layer, embedding and head (dim 0); for PC
every P_out, P_in, R and frozen base W (in `compress.base_dtype`) is a DTensor sharded by rows on
the same mesh. Each rank owns rows [a, b) of W_c (those of its shard of the small weight, FSDP's
dim-0 chunking) and materialises only those: W_c[a:b] = P_out[a:b] W P_in + R[a:b], gathering W
and P_in one tensor at a time; the push uses the rank's rows of the (already reduce-scattered)
gradient G[a:b]: dP_out[a:b] and dR[a:b] stay local, dP_in = sum over ranks of (P_out[a:b] W)^T
G[a:b] is reduce-scattered. The per-tensor products are `ProjectedTensor.step_weight`/`push` run on
a row view of the tensor, so the sharded step is the one-process step cut by rows.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from pcbench.train.distributed import DistEnv


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF model (the classes it names in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def block_of(name: str) -> str:
    """The block a parameter belongs to: its decoder layer (`model.layers.3`), else its module
    (`model.embed_tokens`, `lm_head`, `model.norm`)."""
    m = re.match(r"(.*?\.(?:layers|h|blocks)\.\d+)\.", name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward (HF's non-reentrant checkpointing)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def compile_blocks(model: nn.Module, **options) -> list[nn.Module]:
    """`torch.compile` each decoder layer in place (`nn.Module.compile`: names, state dicts and
    checkpoints unchanged), torchtitan's per-block compile, instead of the whole HF model: the model's
    forward stays eager, so transformers builds no dense causal mask (under dynamo it makes a
    [B,1,S,S] one, transformers#48925) and SDPA keeps `attn_mask=None, is_causal=True`, i.e. flash
    attention on CUDA. Identical layers share one graph (parameters are graph inputs). The order is
    torchtitan's: activation checkpointing first (HF wraps each layer's call around the compiled
    forward), then this, then FSDP's `fully_shard`. Returns the layers compiled."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layers (_no_split_modules) to compile")
    for layer in layers:
        layer.compile(**options)
    return layers


def _is_projected(trainable) -> bool:
    return hasattr(trainable, "tensors") and hasattr(trainable, "names")


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def clip_(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """L2 norm of the gradients of `params` (over every rank's shards); scale them to at most
    `max_norm` (`torch.nn.utils.clip_grad_norm_`'s rule: factor max_norm / (norm + 1e-6), capped at 1)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


class Replicated:
    """One process, or DDP (every rank holds everything; gradients all-reduced on the last micro-batch)."""

    sharded = False

    def __init__(self, trainable, env: DistEnv, net: Optional[nn.Module] = None, compile: "bool | dict" = False):
        self.trainable, self.env = trainable, env
        if net is None:
            net = trainable.network
            if compile:
                compile_blocks(trainable.model, **(compile if isinstance(compile, dict) else {}))
            if env.world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                net = DDP(net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.net = net

    def sync(self, last: bool):
        return contextlib.nullcontext() if self.env.world == 1 or last else self.net.no_sync()

    def before_step(self) -> None:
        self.trainable.before_step()

    def push_all(self) -> None:
        self.trainable.after_backward()

    @torch.no_grad()
    def push(self, keys: Iterable[str]) -> None:
        tr = self.trainable
        small = dict(tr.model.named_parameters())
        for key in keys:
            w = small[tr.names[key]]
            if w.grad is not None:
                tr.tensors[key].push(w.grad)
                w.grad = None

    def export(self):
        return self.trainable.export()

    def gathered(self):
        return contextlib.nullcontext()


class Sharded(Replicated):
    """FSDP2: the small network (or the trained network) sharded per decoder layer, embedding, head
    and root; for PC the projections, residuals and frozen bases sharded by rows (module docstring)."""

    sharded = True

    def __init__(self, trainable, env: DistEnv, compile: "bool | dict" = False, bf16: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.trainable, self.env = trainable, env
        self.mesh = init_device_mesh(env.device.type, (env.world,))
        model = trainable.model
        if compile:  # before fully_shard (torchtitan's order)
            compile_blocks(model, **(compile if isinstance(compile, dict) else {}))
        units = decoder_layers(model)
        if not getattr(model.config, "tie_word_embeddings", False):
            units += [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        self.mp_policy = mixed_precision_policy(bf16)
        kw = {} if self.mp_policy is None else {"mp_policy": self.mp_policy}
        for m in units:
            fully_shard(m, mesh=self.mesh, **kw)
        fully_shard(model, mesh=self.mesh, **kw)
        self.net = model
        self._mids: dict[str, torch.Tensor] = {}
        if _is_projected(trainable):
            self._shard_projections()

    @contextlib.contextmanager
    def sync(self, last: bool):
        """Reduce-scatter gradients only in the last micro-batch's backward (others accumulate)."""
        self.trainable.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.trainable.model.set_requires_gradient_sync(True)

    # -- PC: projections sharded by rows ---------------------------------------------------------
    def _shard_projections(self) -> None:
        from torch.distributed.tensor import Shard, distribute_tensor

        for t in self.trainable.tensors.values():
            for name in ("p_out", "p_in", "residual"):
                p = getattr(t, name)
                if p is not None:  # every rank holds the same full tensor: keep its own rows, no comm
                    setattr(t, name, nn.Parameter(distribute_tensor(p.data, self.mesh, [Shard(0)], src_data_rank=None)))
            t.base = distribute_tensor(t.base, self.mesh, [Shard(0)], src_data_rank=None)

    def _rows(self, n: int) -> tuple[int, int]:
        """This rank's rows of a dim of size n under dim-0 sharding (torch.chunk: ceil(n / world) each)."""
        chunk = -(-n // self.env.world)
        a = min(self.env.rank * chunk, n)
        return a, min(a + chunk, n)

    def _row_view(self, t):
        """A `ProjectedTensor` of this rank's rows of W_c: local P_out/R rows, gathered P_in and
        (when the rows need it) gathered W; plain tensors, so `step_weight`/`push` run unchanged."""
        from pcbench.compress.projected import ProjectedTensor

        k_out, k_in = t.small_shape
        a, b = self._rows(k_out)
        v = ProjectedTensor.__new__(ProjectedTensor)
        nn.Module.__init__(v)
        v.p_out = None if t.p_out is None else t.p_out.to_local().detach()
        v.residual = None if t.residual is None else t.residual.to_local().detach()
        v.p_in = None if t.p_in is None else t.p_in.full_tensor().detach()
        v.idx_out = None if t.idx_out is None else t.idx_out[a:b]
        v.idx_in = t.idx_in
        needs_all_rows = t.p_out is not None or t.idx_out is not None
        v.base = t.base.full_tensor() if needs_all_rows else t.base.to_local()
        v.small_shape = (b - a, k_in)
        v.order, v.precision = t.order, t.precision
        v._mid = None
        return v

    def _full_view(self, t):
        """A `ProjectedTensor` with the gathered P_out, P_in and R of `t` (the frozen base left out)."""
        from pcbench.compress.projected import ProjectedTensor

        v = ProjectedTensor.__new__(ProjectedTensor)
        nn.Module.__init__(v)
        for name in ("p_out", "p_in", "residual"):
            p = getattr(t, name)
            setattr(v, name, None if p is None else p.full_tensor().detach())
        v.keep_out, v.keep_in, v.small_shape, v.order = t.keep_out, t.keep_in, t.small_shape, t.order
        return v

    @contextlib.contextmanager
    def gathered(self):
        """Within: `trainable.tensors` yields each tensor gathered in full, one at a time (every rank
        must iterate it alike), for the recovery metrics that read whole projections."""
        tr = self.trainable
        if not _is_projected(tr):
            yield
            return
        sharded, view = tr.tensors, self._full_view

        class OneAtATime(dict):
            def items(self):
                return ((k, view(t)) for k, t in sharded.items())

        tr.__dict__["tensors"] = OneAtATime(sharded)  # shadows the module attribute
        try:
            yield
        finally:
            del tr.__dict__["tensors"]

    @torch.no_grad()
    def before_step(self) -> None:
        tr = self.trainable
        if not _is_projected(tr):
            return
        self._write_small(getattr(tr, "cache", False))

    @torch.no_grad()
    def _write_small(self, cache: bool) -> None:
        tr = self.trainable
        small = dict(tr.model.named_parameters())
        self._mids = {}
        for key, t in tr.tensors.items():
            w = small[tr.names[key]]
            local = w.to_local()
            v = self._row_view(t)
            rows = v.step_weight(local.device, cache=cache)
            if rows.shape != local.shape:
                raise RuntimeError(f"{tr.names[key]}: rows {tuple(rows.shape)} != local shard {tuple(local.shape)}")
            local.copy_(rows)
            if v._mid is not None:
                self._mids[key] = v._mid
            w.grad = None

    def push_all(self) -> None:
        if _is_projected(self.trainable):
            self.push(list(self.trainable.tensors))

    @torch.no_grad()
    def push(self, keys: Iterable[str]) -> None:
        from torch.distributed.tensor import DTensor, Partial, Shard

        tr = self.trainable
        small = dict(tr.model.named_parameters())
        for key in keys:
            t, w = tr.tensors[key], small[tr.names[key]]
            if w.grad is None:
                self._mids.pop(key, None)
                continue
            v = self._row_view(t)
            v._mid = self._mids.pop(key, None)
            v.push(w.grad.to_local())
            w.grad = None
            for name in ("p_out", "residual", "p_in"):
                p, g = getattr(t, name), getattr(getattr(v, name), "grad", None)
                if p is None or g is None:
                    continue
                if name == "p_in":  # each rank's rows contribute a part of dP_in: sum, keep own rows
                    g = DTensor.from_local(g, self.mesh, [Partial()]).redistribute(self.mesh, [Shard(0)])
                else:
                    g = DTensor.from_local(g, self.mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
                p.grad = g if p.grad is None else p.grad.add_(g)

    # -- export ----------------------------------------------------------------------------------
    def export(self):
        """The trained (PC: materialised small) network gathered to the main process as a plain HF
        model (None elsewhere); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        if _is_projected(self.trainable):
            self._write_small(cache=False)
        model = self.trainable.model
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.main:
            return None
        dtype = next(iter(sd.values())).dtype
        full = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        full.load_state_dict(sd, strict=False)
        missing = set(full.state_dict()) - set(sd)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if missing - tied:
            raise RuntimeError(f"gathered state lacks {sorted(missing - tied)[:3]}")
        return full.to(self.env.device)


def mixed_precision_policy(bf16: bool):
    """FSDP2's policy under bf16 training: parameters all-gathered and computed in bf16, gradients
    reduce-scattered in fp32 (torchtitan's default); the sharded parameters, their gradients and
    AdamW stay fp32. None (FSDP2's fp32 throughout) otherwise."""
    if not bf16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap(trainable, env: DistEnv, spec) -> Replicated:
    """The spec's parallelism (`train.parallel`) around `trainable`, with activation checkpointing
    (`train.activation_checkpointing`) and `train.compile` applied first."""
    from pcbench.spec.config import SpecError

    tc = spec.train
    if tc.activation_checkpointing:
        enable_activation_checkpointing(trainable.model)
    if tc.parallel == "fsdp":
        if spec.compress is not None and spec.compress.base_device == "cpu":
            raise SpecError("compress.base_device", "cpu offload of the base is not supported under fsdp")
        bf16 = tc.precision == "bf16" or (tc.precision == "auto" and env.device.type == "cuda")
        return Sharded(trainable, env, compile=tc.compile, bf16=bf16)
    return Replicated(trainable, env, compile=tc.compile)


# ---------------------------------------------------------------------------------------------
# The update: push, clip, step


def blocks(trainable) -> dict[str, list[str]]:
    """PC: projected tensor keys grouped by block (`block_of` their small-network name), in order."""
    out: dict[str, list[str]] = {}
    if _is_projected(trainable):
        for key in trainable.tensors:
            out.setdefault(block_of(trainable.names[key]), []).append(key)
    return out


def update(par: Replicated, opt: torch.optim.Optimizer, max_norm: float, *, clip: str = "global",
           blockwise: bool = False, check: Callable[[float], None] = lambda norm: None) -> float:
    """Push gradients, clip, and step `opt`; returns the gradient norm (`check` sees it before any step).

    - `global` (default): push every tensor, then clip the norm over everything trained (P, R and
      the small network's directly trained vectors) to `max_norm`; the norm returned is that one.
    - `compressed` (PC): clip the small network's gradient (every weight of `trainable.model`,
      projected and direct) to `max_norm`, push it into P/R, then clip each block's P/R gradient
      (`blocks`: one decoder layer, the embedding, the head) to `max_norm` on its own; directly
      trained vectors are clipped once, with the small network. The norm returned is the small
      network's, before clipping.
    - `blockwise` (PC): push, clip (compressed) and step one block at a time, dropping its P/R
      gradients before the next block is pushed, so they never all exist at once. AdamW's state is
      per parameter and it steps only parameters with gradients, so stepping `opt` once per block
      equals one optimiser per block (the directly trained parameters step with the first block).
      A global norm needs every gradient first: `global` with a finite `max_norm` is refused.
    """
    tr = par.trainable
    if clip == "global" and not blockwise:
        par.push_all()
        norm = clip_(tr.optimized_parameters(), max_norm)
        check(norm)
        opt.step()
        return norm
    if clip == "global" and math.isfinite(max_norm):
        raise ValueError("block-wise stepping cannot clip a global norm; use clip='compressed' or no clipping")
    norm = clip_(tr.model.parameters(), max_norm if clip == "compressed" else math.inf)
    check(norm)
    groups = blocks(tr)
    if not blockwise:
        par.push_all()
        if clip == "compressed":
            for keys in groups.values():
                clip_(_params_of(tr, keys), max_norm)
        opt.step()
        return norm
    stepped = False
    for keys in groups.values():
        par.push(keys)
        params = _params_of(tr, keys)
        if clip == "compressed":
            clip_(params, max_norm)
        opt.step()
        stepped = True
        for p in params:
            p.grad = None
        for p in tr.optimized_parameters():  # the direct ones stepped with the first block
            p.grad = None
    if not stepped:
        opt.step()
    return norm


def _params_of(trainable, keys: Iterable[str]) -> list[nn.Parameter]:
    return [p for k in keys for p in trainable.tensors[k].parameters(recurse=False)]


# ---------------------------------------------------------------------------------------------
# Memory held


def memory(trainable, opt: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """Bytes this process holds (distinct storages of the local tensors: a DTensor counts its
    shard): parameters, buffers (PC: the frozen bases), gradients and optimiser states."""
    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor):
                continue
            s = _local(t).untyped_storage()
            if s.data_ptr() in seen or s.nbytes() == 0:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
        return total

    params = list(trainable.parameters())
    out = {"parameters": nbytes(params), "buffers": nbytes(trainable.buffers()),
           "gradients": nbytes(p.grad for p in params),
           "optimizer": nbytes(v for st in (opt.state.values() if opt is not None else []) for v in st.values())}
    out["persistent"] = out["parameters"] + out["buffers"] + out["optimizer"]
    return out
