"""Data parallelism for the one training loop: replicate (DDP) or shard (FSDP2), behind one interface.

`wrap(trainable, env, spec)` returns a `Replicated` (one process, or DDP) or a `Sharded` (torch's
FSDP2, `fully_shard`, DTensor) that the `Stepper` drives: `net` for the micro-batches, `sync(last)`
around each (gradients are reduced on the last), `before_step`, `push(keys)` (PC: the small
network's weight gradients into P/R), and `update` clips and steps. The loop asks it for `export()`
(a stock HF model on the main process) and `memory()` (bytes this process holds).

Under `Sharded` the small network is sharded per decoder layer, embedding and head (dim 0); for PC
every P_out, P_in, R and frozen base W (in `compress.base_dtype`) is a DTensor sharded by rows on
the same mesh. Each rank owns rows [a, b) of W_c (those of its shard of the small weight, FSDP's
dim-0 chunking) and rows W_r of the base, and W is never gathered (`RowShard`, one tensor at a time):

- `before_step`: P_in is gathered (once per step), B_r = W_r P_in (W_r[:, idx_in] or W_r without
  an input projection) is this rank's rows of B = W P_in; with an output side B is gathered and
  W_c[a:b] = P_out[a:b] B (B[idx_out[a:b]]), else W_c[a:b] = B_r; + R[a:b]. B_r is kept to the push
  where P_out needs it (1/world of B per tensor); without an input side (o_proj: P_out only) B is W
  itself, gathered here and kept whole (in the base's dtype) to the push (the plan counts it), so
  W is gathered once;
- `push`, with G_r = the rank's rows of the (reduce-scattered) gradient of W_c: dR[a:b] = G_r,
  dP_out[a:b] = G_r B^T (B gathered again from the kept B_r, or the kept W), and dP_in = W^T P_out^T G
  as H = P_out[a:b]^T G_r (or G_r added at rows idx_out[a:b]) reduce-scattered to H[W_r's rows], then
  W_r^T H[rows] reduce-scattered to the rank's rows of dP_in (without an output side W_r^T G_r).
Per tensor and step: one gather of P_in, two of B (out x k_in; one where B is W), two reduce-scatters.
Without the step cache (`Projected(cache=False)`) nothing is kept: B_r is made again and B (W for
o_proj) gathered again in the push. The products run at the tensor's fixed precision
(`ProjectedTensor._mm`, `precision_scope`, `operand_dtype`): the one-process step's products cut by
rows, summed in another order.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch
from torch import nn

from pcbench.train.distributed import DistEnv

if TYPE_CHECKING:
    from pcbench.compress.projected import ProjectedTensor


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


def chunk_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """`rank`'s rows [a, b) of a dim of size n under dim-0 sharding (torch.chunk: ceil(n / world) each)."""
    chunk = -(-n // world)
    a = min(rank * chunk, n)
    return a, min(a + chunk, n)


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
        # PC: per tensor, from before_step to its push, B_r or (o_proj) B = W whole; and which
        self._kept: dict[str, tuple[torch.Tensor, bool]] = {}
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
        return chunk_rows(n, self.env.world, self.env.rank)

    def _row_shard(self, t) -> "RowShard":
        """This rank's pieces of `t` (local DTensor shards, nothing gathered)."""
        k_out = t.small_shape[0]
        a, b = self._rows(k_out)
        return RowShard(t=t, w=t.base.to_local(), n_out=t.base.shape[0],
                        p_out=None if t.p_out is None else t.p_out.to_local().detach(),
                        residual=None if t.residual is None else t.residual.to_local().detach(),
                        idx_out=None if t.idx_out is None else t.idx_out[a:b])

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
        """W_c's rows into each small weight's local shard; with `cache`, keep B_r for the push."""
        tr = self.trainable
        small = dict(tr.model.named_parameters())
        comm = MeshComm(self.mesh)
        self._kept = {}
        for key, t in tr.tensors.items():
            w = small[tr.names[key]]
            local = w.to_local()
            s = self._row_shard(t)
            if s.rows_shape() != tuple(local.shape):
                raise RuntimeError(f"{tr.names[key]}: rows {s.rows_shape()} != local shard {tuple(local.shape)}")
            p_in = None if t.p_in is None else t.p_in.full_tensor().detach()  # the step's one gather of P_in
            whole = cache and s.b_is_w()  # o_proj: W gathered here once, kept whole to the push
            b_rows = s.materialise(p_in, comm, local, keep_whole=whole)
            del p_in
            if cache and s.push_reads_b():
                self._kept[key] = (b_rows, whole)
            w.grad = None

    def push_all(self) -> None:
        if _is_projected(self.trainable):
            self.push(list(self.trainable.tensors))

    @torch.no_grad()
    def push(self, keys: Iterable[str]) -> None:
        from torch.distributed.tensor import DTensor, Shard

        tr = self.trainable
        small = dict(tr.model.named_parameters())
        comm = MeshComm(self.mesh)
        for key in keys:
            t, w = tr.tensors[key], small[tr.names[key]]
            b_rows, whole = self._kept.pop(key, (None, False))
            if w.grad is None:
                continue
            s = self._row_shard(t)
            if b_rows is None and s.push_reads_b():  # no cache: recompute B_r (P_in gathered again)
                b_rows = s.b_rows(None if t.p_in is None else t.p_in.full_tensor().detach())
            grads = s.push(w.grad.to_local(), b_rows, comm, whole=whole)
            del b_rows
            w.grad = None
            for name, g in grads.items():  # each already this rank's rows
                p = getattr(t, name)
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


class MeshComm:
    """The two collectives of PC's row-sharded step on a 1-d mesh (dim-0 chunks, torch.chunk's)."""

    def __init__(self, mesh):
        self.mesh = mesh

    def gather(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """The full [n, ...] tensor from every rank's dim-0 chunk `rows`."""
        from torch.distributed.tensor import DTensor, Shard

        shape = (n, *rows.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(rows, self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=stride).full_tensor()

    def reduce_scatter(self, part: torch.Tensor) -> torch.Tensor:
        """This rank's dim-0 chunk of the sum over ranks of `part` (every rank's the same shape)."""
        from torch.distributed.tensor import DTensor, Partial, Shard

        return DTensor.from_local(part, self.mesh, [Partial()]).redistribute(self.mesh, [Shard(0)]).to_local()


@dataclass
class RowShard:
    """One rank's pieces of a `ProjectedTensor` `t` under row sharding (module docstring): the rows
    W_r of its base, P_out[a:b], R[a:b] and idx_out[a:b] for its rows [a, b) of W_c. The local
    products of the sharded step; the collectives go through `comm` (`MeshComm`, or a simulation),
    P_in arrives gathered. Precision and dtypes are `t`'s (`_mm`, `precision_scope`, `operand_dtype`)."""

    t: "ProjectedTensor"
    w: torch.Tensor
    n_out: int
    p_out: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    idx_out: Optional[torch.Tensor] = None

    def _out_side(self) -> bool:
        return self.p_out is not None or self.idx_out is not None

    def rows_shape(self) -> tuple[int, int]:
        """The shape of this rank's rows of W_c."""
        k_in = self.t.small_shape[1]
        if self._out_side():
            return (len(self.p_out) if self.p_out is not None else len(self.idx_out), k_in)
        return (self.w.shape[0], k_in)

    def push_reads_b(self) -> bool:
        """Does the push need B (dP_out = G B^T)?"""
        return self.p_out is not None

    def b_rows(self, p_in: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B_r = W_r P_in (into `out` when it fits), or without an input projection W_r[:, idx_in]
        or W_r itself (a view), in the base's dtype (cast where read). With P_out under bf16
        precision B_r is kept in bf16, the operand `_mm` rounds it to anyway."""
        t = self.t
        if p_in is None:
            return self.w if t.idx_in is None else self.w.index_select(1, t.idx_in.to(self.w.device))
        with t.precision_scope():
            b = t._mm(self.w.to(t.operand_dtype()), p_in, out)
        return b.to(torch.bfloat16) if t.precision == "bf16" and self.p_out is not None else b

    def _b_full(self, b_rows: torch.Tensor, comm) -> torch.Tensor:
        """B gathered from every rank's B_r, as an operand of the products."""
        return self._operand(comm.gather(b_rows, self.n_out))

    def _operand(self, b: torch.Tensor) -> torch.Tensor:
        return b.to(self.t.operand_dtype()) if self.t.p_in is None else b

    def b_is_w(self) -> bool:
        """Is B the base itself gathered (P_out trained, no input side: o_proj under PC)? Then the
        push's B is the one `materialise` gathered, kept whole (`materialise(keep_whole=True)`)."""
        return self.p_out is not None and self.t.p_in is None and self.t.idx_in is None

    def materialise(self, p_in: Optional[torch.Tensor], comm, out: torch.Tensor,
                    keep_whole: bool = False) -> torch.Tensor:
        """Write this rank's rows of W_c into `out`; returns what the push reads: B_r, or with
        `keep_whole` where `b_is_w()` the gathered B (W, in the base's dtype), so that W is
        gathered once per step."""
        t = self.t
        kept = None
        if not self._out_side():  # W_c's rows are B_r (then P_in is trained)
            b_rows = w = self.b_rows(p_in, out)
        else:
            b_rows = self.b_rows(p_in)
            gathered = comm.gather(b_rows, self.n_out)
            b = self._operand(gathered)
            with t.precision_scope():
                w = t._mm(self.p_out, b, out) if self.p_out is not None else b.index_select(0, self.idx_out)
            if keep_whole and self.b_is_w():
                kept = gathered
            del b, gathered
        if w is not out:
            out.copy_(w)
        del w
        if self.residual is not None:
            out.add_(self.residual)
        return b_rows if kept is None else kept

    def push(self, grad: torch.Tensor, b_rows: Optional[torch.Tensor], comm,
             whole: bool = False) -> dict[str, torch.Tensor]:
        """This rank's rows of dL/dP_out, dL/dP_in and dL/dR (by parameter name) for this rank's
        rows `grad` of dL/dW_c; `b_rows` is B_r (needed with P_out), or B itself when `whole` (what
        `materialise(keep_whole=True)` returned: nothing gathered)."""
        t = self.t
        g = grad.to(t._param_dtype())
        mm = t._mm
        out: dict[str, torch.Tensor] = {}
        with t.precision_scope():
            if self.p_out is not None:
                b = self._operand(b_rows) if whole else self._b_full(b_rows, comm)
                out["p_out"] = mm(g, b.t())
                del b
            if t.p_in is not None:
                if self.p_out is not None:  # H = P_out^T G, partial over ranks
                    h = comm.reduce_scatter(mm(self.p_out.t(), g))
                elif self.idx_out is not None:  # G's rows placed at idx_out, partial over ranks
                    h = torch.zeros(self.n_out, g.shape[1], dtype=g.dtype, device=g.device)
                    h = comm.reduce_scatter(h.index_add_(0, self.idx_out, g))
                else:
                    h = g
                w = self.w.to(t.operand_dtype())
                out["p_in"] = comm.reduce_scatter(mm(w.t(), h))
        if self.residual is not None:
            out["residual"] = g
        return out


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
