"""The one training loop: pretraining, hard pruning with retraining (HPR) and Projected Compression.

The methods differ only in the `Trainable` they build (`build_trainable`): what the optimiser
steps and how gradients reach it. The loop itself is shared: AdamW with linear warm-up and cosine
decay, gradient accumulation, DDP or FSDP2 across processes (`pcbench.train.parallel`), bf16 autocast on CUDA, atomic checkpoints with
bit-exact resume, JSON-lines metrics, and a final record carrying the paper's metric (training
cross-entropy averaged over the last 100 steps) and the held-out loss.

SIGINT/SIGTERM/SIGHUP/SIGQUIT (inside `interrupts.graceful()`, as jobs run) stop the loop after the current step:
it saves a checkpoint there (when checkpoints are on) and raises `Interrupted`; a rerun resumes
bit-exactly, and metric lines are never written twice for a step. Off a TTY, progress is a log line
every 10% of the steps (a tqdm bar on a TTY). Every metric line also goes to the run's trackers
(`train.track`, `pcbench.tracking`), and the export carries a model card (`pcbench.card`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pcbench.train import checkpoint, dcp_checkpoint, distributed, interrupts, parallel
from pcbench.train.loss import cross_entropy

from pcbench.spec import methods

from pcbench import models, tracking
from pcbench.train import memory as memory_plan
from pcbench.util.atomic import append_jsonl, read_jsonl, write_json, write_text
from pcbench.util.verify import Damaged, Unsealed, read_sealed_json, warn, write_sealed_json
from pcbench.spec.config import RunSpec, SpecError, to_dict
from pcbench.evaluate import autocast_for, heldout_loss
from pcbench.store import RunPaths, stale_dir  # the store owns the record layout (re-exported here)
from pcbench.compress.trainable import Direct

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf; the run stops before the optimiser step,
    so the last checkpoint holds finite weights."""

    def __init__(self, step: int, value: float, what: str = "loss"):
        self.step = step
        self.value = value
        super().__init__(f"non-finite {what} {value} at step {step}; last good checkpoint kept")


# ---------------------------------------------------------------------------------------------
# Schedule and loss


def lr_factor(step: int, total: int, warmup: float, start: float, final: float) -> float:
    """Multiplier of the peak lr at `step`: linear from `start` over the warm-up, then cosine to `final`."""
    w = int(warmup if warmup >= 1 else round(warmup * total))
    if w > 0 and step < w:
        return start + (1 - start) * step / w
    span = max(1, total - w)
    progress = min(1.0, (step - w) / span)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
            alpha: float = 0.0, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, cross-entropy). With a teacher: (1-a)*CE + a*T^2*KL(teacher || student).
    Without one, bf16 logits (autocast) go through `loss.cross_entropy` chunk by chunk, so no fp32
    copy of them exists; fp32 logits take `F.cross_entropy` as before."""
    if teacher_logits is None or alpha == 0:
        ce = cross_entropy(logits, targets)
        return ce, ce
    logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    t = temperature
    student = F.log_softmax(logits / t, dim=-1).flatten(0, 1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, 1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * t * t * kl, ce


def total_steps(spec: RunSpec) -> int:
    t = spec.train
    if t.steps is not None:
        return t.steps
    return math.ceil(t.tokens / (t.batch_size * spec.data.seq_len))


# ---------------------------------------------------------------------------------------------
# Building what is trained


def data_tokenizer_name(spec: RunSpec) -> str:
    """The tokenizer the data is tokenised with: `model` means the base checkpoint's own."""
    if spec.data.tokenizer == "model":
        return models.pretrained_path(spec.model)
    return spec.data.tokenizer


def _check_data_tokenizer(spec: RunSpec, tok, load_tokenizer) -> None:
    """The data must be tokenised with the checkpoint's own tokenizer."""
    if spec.data.tokenizer != "model":
        data_tok = load_tokenizer(spec.data.tokenizer, corpus=spec.data.corpus)
        if data_tok.get_vocab() != tok.get_vocab():
            raise SpecError("data.tokenizer", f"{spec.data.tokenizer!r} is not the tokenizer of the "
                            f"checkpoint {models.pretrained_path(spec.model)}; use `model` or the same one")


def open_run_stores(spec: RunSpec, tokenizer: str) -> dict:
    """The run's prepared token stores, opened read-only (`data.shards.open_store`): no tokenising,
    no lock, no connection; an unprepared store is one line naming `pcbench prepare`."""
    from pcbench.data.shards import open_store
    from pcbench.spec.stores import run_stores

    return {role: open_store(s.ref, n_tokens=s.n_tokens, need=s.need)
            for role, s in run_stores(spec, tokenizer).items()}


def _saved_plan(path: Path):
    """The kept indices a run saved when it started (sealed), for its resume; None when there are
    none, or when they were damaged (one warning line: the plan is computed again, which gives the
    same indices, deterministic in the spec). An unsealed one (an older pcbench's) is read as is."""
    from pcbench.compress.plan import Plan

    try:
        return Plan.from_dict(read_sealed_json(path, "kept-index plan"))
    except FileNotFoundError:
        return None
    except Unsealed:
        try:
            return Plan.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError):
            warn(f"kept-index plan damaged: {path} (unreadable); computing it again")
            return None
    except Damaged as e:
        warn(f"{e}; computing it again")
        return None
    except (KeyError, TypeError, ValueError):
        warn(f"kept-index plan damaged: {path} (not a plan); computing it again")
        return None


def build_trainable(spec: RunSpec, paths: RunPaths, device: torch.device, calibration=None):
    """(trainable, tokenizer, teacher, info) for the spec's kind: pretrain, finetune, or a registered
    compression method (`pcbench.spec.methods.METHODS`), built by its builder module."""
    from pcbench.data.tokenizer import load_tokenizer

    info: dict = {}
    if spec.kind == "finetune":  # e.g. the paper's "dataset alignment" of a base to new data
        model, tok = models.load_pretrained(spec.model)
        _check_data_tokenizer(spec, tok, load_tokenizer)
        model = model.to(device)
        info["model"] = models.describe(model)
        return Direct(model), tok, None, info
    if spec.compress is None:
        tok = load_tokenizer(data_tokenizer_name(spec), corpus=spec.data.corpus)
        vocab = models.vocab_size_for(spec.data.tokenizer) or len(tok)
        if vocab < len(tok):
            raise SpecError("data.tokenizer", f"{spec.data.tokenizer!r} has {len(tok)} tokens, more than {vocab}")
        padded = models.padded_vocab(vocab, spec.model.pad_vocab)
        config = models.build_config(spec.model, padded, spec.data.seq_len,
                                     tok.bos_token_id, tok.eos_token_id)
        if padded != vocab:  # trained padded, exported at the tokenizer's size (`export_vocab`)
            info["vocab"] = {"tokenizer": vocab, "padded": padded}
        model = models.build_model(config, seed=spec.train.seed).to(device)
        info["model"] = models.describe(model)
        return Direct(model), tok, None, info

    from pcbench.compress import importance as imp
    from pcbench.compress.plan import Plan, make_plan

    c = spec.compress
    base, tok = models.load_pretrained(spec.model)
    _check_data_tokenizer(spec, tok, load_tokenizer)
    info["base"] = models.describe(base)
    plan = _saved_plan(paths.plan)  # resume: reuse the exact kept indices
    if plan is None:
        scores = imp.score(base, c.importance, seed=c.importance_seed,
                           batches=calibration() if c.importance == "activation" else None)
        plan = make_plan(base, c.compression, scores, align=c.align)
        write_sealed_json(paths.plan, plan.to_dict())
    info["plan"] = {k: v for k, v in plan.to_dict().items() if k != "keep"}
    teacher = None
    if c.distill > 0:
        teacher = base.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    trainable = methods.build(c.method, base, plan, spec, device, teacher)  # the method's builder module
    info["model"] = models.describe(trainable.model)
    return trainable, tok, teacher, info


# ---------------------------------------------------------------------------------------------
# The loop


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    # RNG states must be CPU byte tensors; a checkpoint loaded with map_location=cuda moves them.
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _resume(paths: RunPaths, trainable, opt, sched, env: distributed.DistEnv, sharded: bool,
            owner: Optional[str] = None):
    """Load the newest valid checkpoint into `trainable`, `opt`, `sched` and the RNGs, and release it:
    (start step, losses, elapsed, interval losses, {"found", "problems"}).

    The checkpoint is read to CPU (`map_location="cpu"`, never the device), each part is applied and
    dropped at once, and nothing of it is referenced once this returns: the parameters are copied
    into the model, so a kept `state` would be a second copy of the network for the whole run
    (nanoGPT's `checkpoint = None`). AdamW's loaded states are moved to the parameters' device by
    `load_state_dict` (on CPU they are adopted as they are, and become the optimiser's own)."""
    if sharded:  # every rank loads its shards into trainable and opt; `state` holds the rest
        state, problems = dcp_checkpoint.load_latest(paths.ckpt, trainable, opt, env, owner=owner)
    else:
        state, problems = checkpoint.load_latest(paths.ckpt, map_location="cpu", owner=owner)
    if state is None:
        return 0, [], 0.0, [], {"found": False, "problems": problems}
    if not sharded:
        trainable.load_state_dict(state.pop("trainable"))
        opt.load_state_dict(state.pop("optimizer"))
    sched.load_state_dict(state.pop("scheduler"))
    _set_rng_state(state.pop("rng"))
    out = (state["step"], list(state["losses"]), state["elapsed"],
           list(state.get("interval_losses", [])),  # the logging interval in progress
           {"found": True, "problems": problems})
    state.clear()
    del state
    return out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adamw_options(device) -> dict:
    """AdamW's implementation on `device`: fused on CUDA (one kernel over every parameter, no
    foreach temporaries; nanoGPT, torchtitan), torch's default elsewhere (CPU: unchanged, so the
    committed CPU studies stay bitwise)."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def amp_ctx(device: torch.device, precision: str):
    """A factory of fresh autocast contexts (one per micro-batch)."""
    return lambda: autocast_for(device, precision)


class Stepper:
    """One optimiser step, shared by the training loop and the benchmarks: `before_step`, every
    micro-batch forward/backward (gradients reduced on the last), then `parallel.update` (push,
    clip, AdamW), schedule. `par` (`parallel.wrap`) is the DDP or FSDP wrapper; without it `net` is
    used as is (one process or a DDP module)."""

    def __init__(self, trainable, net, opt, sched, *, micro: int, amp=None, teacher=None, alpha: float = 0.0,
                 temperature: float = 1.0, grad_clip: float = 1.0, env: Optional[distributed.DistEnv] = None,
                 par: Optional[parallel.Replicated] = None, clip: str = "global", blockwise: bool = False):
        self.trainable, self.opt, self.sched = trainable, opt, sched
        self.micro, self.amp, self.teacher = micro, amp or (lambda: contextlib.nullcontext()), teacher
        self.alpha, self.temperature, self.grad_clip = alpha, temperature, grad_clip
        self.env = env or distributed.DistEnv(0, 1, 0, torch.device("cpu"))
        self.par = par or parallel.Replicated(trainable, self.env, net=net)
        self.net = self.par.net
        self.clip, self.blockwise = clip, blockwise

    def __call__(self, batch: torch.Tensor, step: int) -> tuple[float, float]:
        """Train on `batch` (this process's rows, [rows, seq+1]); returns (mean CE, grad norm)."""
        self.par.before_step()
        chunks = batch.split(self.micro)
        loss_sum = torch.zeros((), device=batch.device)
        for i, mb in enumerate(chunks):
            last = i == len(chunks) - 1
            with self.par.sync(last):
                with self.amp():
                    logits = self.net(input_ids=mb[:, :-1]).logits
                    t_logits = None
                    if self.teacher is not None:
                        with torch.no_grad():
                            t_logits = self.teacher(input_ids=mb[:, :-1]).logits
                loss, ce = lm_loss(logits, mb[:, 1:], t_logits, self.alpha, self.temperature)
                (loss / len(chunks)).backward()
                # free the logits (and the teacher's) now, not when the next micro-batch rebinds them:
                # the last micro-batch's would otherwise live through clip and AdamW (torchtitan: `del pred`)
                del logits, t_logits, loss
            loss_sum += ce.detach()
            del ce
        step_loss = float(distributed.all_mean(loss_sum / len(chunks), self.env))
        if not math.isfinite(step_loss):
            raise NonFiniteLoss(step, step_loss)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf

        def check(norm: float) -> None:
            if not math.isfinite(norm):
                raise NonFiniteLoss(step, norm, "gradient norm")

        grad_norm = parallel.update(self.par, self.opt, max_norm, clip=self.clip, blockwise=self.blockwise,
                                    check=check)
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        for p in self.trainable.model.parameters():
            p.grad = None
        return step_loss, grad_norm


def work_identity(spec: RunSpec, train_store, lineage: Optional[str]) -> dict:
    """What a run's work state (checkpoints, plan, export) is made for: the records' `lineage`, the
    resolved spec, the token store it trains on (its key names the corpus inputs and tokenizer) and,
    for a pcbench base model, that model's recorded files (`store.claim_work`)."""
    from pcbench.spec.config import to_dict
    from pcbench.util import outputs
    from pcbench.util.verify import sha256_json

    ident = {"lineage": lineage, "spec": sha256_json(to_dict(spec)), "data": train_store.path.name,
             "data_sha256": train_store.meta.get("tokens_sha256")}
    if spec.model.path and Path(spec.model.path).is_dir():
        base = outputs.output_digest(outputs.read_marker(spec.model.path))
        if base is None:  # a checkpoint pcbench did not write: its files' own sha256 (cached per version)
            base = sha256_json(_dir_files_sha256(Path(spec.model.path)))
        ident["base"] = base
    return ident


def _dir_files_sha256(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a model directory (hidden files and folders left
    out): what names a base checkpoint that carries no pcbench marker, so one replaced in place
    never resumes state made from the old one."""
    from pcbench.util.verify import digest_files

    rels = [str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return digest_files(root, rels)


def _set_aside_records(paths: RunPaths, moved: Optional[Path]) -> None:
    """A run that starts over (its work state belonged to another spec, data or lineage: moved aside
    to `moved`, or there was none to move) moves the records that state left (the final record,
    metric and recovery lines) aside beside it: the records never mix two runs. One warning line per
    run: `claim_work`'s, which names `moved` (the records go to its `record/`), or this one's when
    there was no state to move."""
    old = [p for p in (paths.final, paths.metrics, paths.recovery) if p.exists()]
    if not old:
        return
    said = moved is not None  # claim_work named it in its line
    if moved is None:
        moved = stale_dir(paths.work)
    (moved / "record").mkdir(parents=True, exist_ok=True)
    for p in old:
        os.replace(p, moved / "record" / p.name)
    if not said:
        warn(f"{paths.record}: records of the earlier run ({', '.join(p.name for p in old)}) moved aside to "
             f"{moved / 'record'}; this run starts over")


def _set_aside_checkpoints_ahead(paths: RunPaths, log_every: int) -> None:
    """Checkpoints ahead of the run's records (records restored from an earlier copy, or deleted
    while the work state was kept) are moved aside to `<work>/.stale/<when>/`, with one warning line:
    resuming from one would leave the steps between the records' last line and it out of
    `metrics.jsonl`. A checkpoint of step s is behind the records when their last line is at or
    past s's last logging step (lines are appended before the checkpoint of the same step)."""
    ckpts = checkpoint.list_checkpoints(paths.ckpt)
    if not ckpts:
        return
    last = max((r.get("step", 0) for r in read_jsonl(paths.metrics)), default=0) if paths.metrics.exists() else 0

    def step_of(p: Path) -> int:
        return int(p.name.split("_")[-1])

    ahead = [p for p in ckpts if step_of(p) - step_of(p) % max(log_every, 1) > last]
    if not ahead:
        return
    moved = stale_dir(paths.work) / "ckpt"
    moved.mkdir(parents=True)
    for p in ahead:
        os.replace(p, moved / p.name)
    left = [step_of(p) for p in ckpts if p not in ahead]
    warn(f"{paths.ckpt}: checkpoints of step {', '.join(str(step_of(p)) for p in ahead)} are ahead of the run's "
         f"records ({paths.metrics.name} ends at step {last}): moved aside to {moved}; "
         + (f"resuming from step {max(left)}" if left else "training from the start"))


def _batches(store, seq_len: int, seed: int, rows: int):
    """The run's batches of `store`, refused in one line before any work when the store cannot
    give one batch of `rows` windows (a small `data.max_tokens`, or a small corpus)."""
    from pcbench.data.tokens import Batches

    try:
        batches = Batches(store, seq_len, seed=seed)
    except ValueError as e:
        raise SpecError("data.max_tokens", f"{e}: give a larger cap (or a larger corpus)") from None
    if batches.n_windows < rows:
        raise SpecError("data.max_tokens", f"the token store holds {batches.n_windows} windows of "
                        f"{seq_len + 1} tokens, fewer than one batch of {rows} rows: give a larger cap "
                        "(or a larger corpus)")
    return batches


def train(spec: RunSpec, paths: RunPaths, progress: Optional[bool] = None, name: Optional[str] = None,
          provenance: Optional[dict] = None, tracked: Optional[tracking.RunInfo] = None,
          lineage: Optional[str] = None, adopt: bool = False) -> dict:
    """Train `spec` to completion, resuming from `paths.ckpt` if a checkpoint exists there that
    belongs to this run: `lineage` (the records' identity, `store.new_lineage`), spec and data
    (`work_identity`); state left by anything else is moved aside (`store.claim_work`; `adopt`, or
    no `lineage`: state from before owners were recorded is kept).

    Returns the final record (written once, to `paths.final`, with the caller's `provenance` keys
    added, e.g. `tuned`: where a tuned value came from); raises `NonFiniteLoss` on NaN/inf and
    `interrupts.Interrupted` on a signal. `progress`: True a bar, False nothing, None a bar on a
    TTY and log lines (named `name`) elsewhere. `tracked`: who the run is to the trackers of
    `train.track` (`pcbench.tracking`; default: `name` in stage `spec.kind`, state in `paths.work`).
    """
    from pcbench.data.loader import Prefetcher
    from pcbench.data.tokens import Batches, eval_batches

    spec.validate()
    t0 = time.time()
    tc, dc = spec.train, spec.data
    env = distributed.setup(tc.device, group=tc.parallel == "fsdp")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    _seed_all(tc.seed)
    rows = tc.batch_size // env.world
    if tc.batch_size % env.world:
        raise SpecError("train.batch_size", f"{tc.batch_size} rows do not split over {env.world} processes")
    micro = min(tc.micro_batch_size or rows, rows)
    if rows % micro:
        raise SpecError("train.micro_batch_size", f"{micro} does not divide the {rows} rows per process")
    steps = total_steps(spec)
    if env.main:
        paths.record.mkdir(parents=True, exist_ok=True)
        paths.work.mkdir(parents=True, exist_ok=True)
    distributed.barrier(env)
    # trackers (pcbench.tracking, their own process: started now, they load while the model is built),
    # fed every metric line written below; they never fail or slow the run
    stores = open_run_stores(spec, data_tokenizer_name(spec))  # prepared before: only read here
    train_store = stores["train"]
    data_seed = tc.seed if tc.data_seed is None else tc.data_seed
    batches = _batches(train_store, dc.seq_len, data_seed, tc.batch_size)
    tracker = tracking.Session(tc.track if env.main else [], tracked or tracking.RunInfo(
        name or spec.kind, spec.kind, paths.work), to_dict(spec))
    card_name = name or (tracked.name if tracked else None)

    def calibration():
        cal = Batches(train_store, dc.seq_len, seed=spec.compress.importance_seed + 7919)
        return [cal.get(i, micro)[:, :-1] for i in range(spec.compress.calibration_batches)]

    from pcbench.store import claim_work, read_record
    from pcbench.util.verify import sha256_json

    ident = work_identity(spec, train_store, lineage)
    owner = sha256_json(ident)[:16]
    if env.main:
        prior = read_record(paths.owner) if paths.owner.exists() else None
        moved = claim_work(paths, ident, adopt=adopt or lineage is None, say=warn)
        if moved is not None or (prior is not None and prior != ident):  # the run starts over
            _set_aside_records(paths, moved)
        _set_aside_checkpoints_ahead(paths, tc.log_every)
    distributed.barrier(env)
    trainable, tokenizer, teacher, info = build_trainable(spec, paths, env.device, calibration)
    vocab = trainable.model.config.vocab_size
    if len(tokenizer) > vocab:
        raise SpecError("data.tokenizer", f"tokenizer has {len(tokenizer)} tokens, model vocab is {vocab}")
    eval_store = stores.get("eval")

    par = parallel.wrap(trainable, env, spec)  # ddp (one process or DDP) or fsdp (FSDP2)
    net = par.net
    o = spec.optim
    opt = torch.optim.AdamW(trainable.param_groups(o.weight_decay, decay_norms=o.decay_norms), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps, **adamw_options(env.device))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, o.warmup, o.warmup_start, o.final_lr))

    # Resume (the checkpoint is released before the first step).
    start, losses, elapsed, interval_losses, resumed = _resume(paths, trainable, opt, sched, env,
                                                               par.sharded, owner=owner)
    problems = resumed["problems"]
    last_logged = {}  # file -> last step written: appends only go forward
    if env.main:  # keep the lines up to the checkpoint (once each, in order); none on a fresh start
        for p in (paths.metrics, paths.recovery):
            kept, seen = [], set()
            for r in read_jsonl(p) if resumed["found"] else []:
                if r.get("step", 0) <= start and r.get("step") not in seen:
                    seen.add(r.get("step"))
                    kept.append(r)
            kept.sort(key=lambda r: r.get("step", 0))
            if kept or p.exists():
                write_text(p, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
            last_logged[p] = kept[-1].get("step", 0) if kept else -1

    def append_once(path: Path, rec: dict) -> None:
        if rec["step"] > last_logged.get(path, -1):
            append_jsonl(path, rec)
            last_logged[path] = rec["step"]
            tracker.log(path.stem, rec)

    stepper = Stepper(trainable, net, opt, sched, micro=micro, amp=amp_ctx(env.device, tc.precision),
                      teacher=teacher, alpha=spec.compress.distill if spec.compress else 0.0,
                      temperature=spec.compress.temperature if spec.compress else 1.0,
                      grad_clip=o.grad_clip, env=env, par=par, clip=o.clip,
                      blockwise=bool(spec.compress and spec.compress.blockwise_step))
    tokens_per_step = tc.batch_size * dc.seq_len
    flops_tok = models.flops_per_token(trainable.model.config, dc.seq_len)
    fixed_flops = trainable.fixed_flops_per_step()
    recovery_every = spec.compress.recovery_every if spec.compress else 0

    def save_ckpt(step: int) -> None:
        extra = {"scheduler": sched.state_dict(), "rng": _rng_state(), "step": step,
                 "losses": losses[-tc.last_k:], "elapsed": elapsed, "interval_losses": list(interval_losses)}
        if par.sharded:  # every rank writes its shards
            with interrupts.deferred():
                dcp_checkpoint.save(paths.ckpt, step, trainable, opt, extra, env, keep=tc.keep_checkpoints,
                                    owner=owner)
            return
        if env.main:
            with interrupts.deferred():
                checkpoint.save(paths.ckpt, step, {
                    "trainable": trainable.state_dict(), "optimizer": opt.state_dict(), **extra},
                    keep=tc.keep_checkpoints, owner=owner)
        distributed.barrier(env)

    def log_recovery(step: int) -> None:
        # sharded projections: every rank takes part in the sums, the main process writes
        if (env.main or par.sharded) and recovery_every and hasattr(trainable, "recovery_detail"):
            with par.gathered():
                rec = {"step": step, **trainable.step_metrics(step), "tensors": trainable.recovery_detail()}
            if env.main:
                append_once(paths.recovery, rec)

    if start == 0:
        log_recovery(0)
    tty = sys.stderr.isatty()
    show = env.main and (progress if progress is not None else tty)
    lines_every = max(1, steps // 10) if env.main and progress is None and not tty else 0
    label = name or spec.kind
    bar = tqdm(total=steps, initial=start, disable=not show, desc=label, unit="step", dynamic_ncols=True)
    interval_t, run_t = time.time(), time.time()
    net.train()
    with interrupts.deferred(), tracker:  # a signal stops the loop at the next step boundary
        feed = Prefetcher(lambda i: batches.get(i, tc.batch_size, rank=env.rank, world=env.world),
                          env.device, steps)  # the next batch is cut while this step runs
        for step in range(start, steps):
            step_t = time.time()
            batch = feed.get(step)
            lr = opt.param_groups[0]["lr"]
            try:
                step_loss, grad_norm = stepper(batch, step)
            except NonFiniteLoss:
                bar.close()
                raise
            elapsed += time.time() - step_t
            losses.append(step_loss)
            losses = losses[-tc.last_k:]
            interval_losses.append(step_loss)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            logging_now = done % tc.log_every == 0 or done == steps
            held_now = None
            if (env.main or par.sharded) and logging_now and tc.eval_every and done % tc.eval_every == 0 \
                    and eval_store is not None:  # sharded: every rank runs the forward
                held_now = heldout_loss(trainable.model, eval_batches(
                    eval_store, dc.seq_len, micro, dc.eval_batches), env.device, tc.precision)
            if env.main and logging_now:
                now = time.time()
                rec = {"step": done, "loss": step_loss, "loss_avg": sum(interval_losses) / len(interval_losses),
                       "lr": lr, "grad_norm": grad_norm, "tokens": done * tokens_per_step, "seconds": round(elapsed, 3),
                       "tokens_per_s": len(interval_losses) * tokens_per_step / max(now - interval_t, 1e-9)}
                if held_now is not None:
                    rec["heldout_loss"] = held_now
                append_once(paths.metrics, rec)
                interval_t, interval_losses = time.time(), []
            if recovery_every and done % recovery_every == 0:
                log_recovery(done)
            saved = bool(tc.ckpt_every and done % tc.ckpt_every == 0 and done < steps)
            if saved:
                save_ckpt(done)
            if lines_every and (done % lines_every == 0 or done == steps):
                rate = (done - start) / max(time.time() - run_t, 1e-9)
                print(f"[pcbench] {label}: step {done}/{steps} ({100 * done // steps}%), loss {step_loss:.4f}, "
                      f"{rate:.2f} step/s, eta {_duration((steps - done) / rate)}", file=sys.stderr, flush=True)
            if _stop_requested(env) and done < steps:
                bar.close()
                if tc.ckpt_every and not saved:  # a consistent step boundary: cheap to keep
                    save_ckpt(done)
                raise interrupts.Interrupted(interrupts.requested() or signal.SIGTERM, step=done)
    bar.close()
    feed.close()

    # Final record, export.
    memory = distributed.all_gather_object(parallel.memory(trainable, opt), env)
    export = par.export()  # fsdp: gathered to the main process (None elsewhere)
    if export is not None and "vocab" in info:  # model.pad_vocab: a stock model of the tokenizer's size
        export = models.unpad_vocab(export, info["vocab"]["tokenizer"])
    held = None  # no held-out set (data.eval_batches: 0): null, JSON's "no value"
    if eval_store is not None and export is not None:
        held = heldout_loss(export, eval_batches(eval_store, dc.seq_len, micro, dc.eval_batches),
                            env.device, tc.precision)
    record = {
        "kind": spec.kind, "steps": steps, "tokens": steps * tokens_per_step,
        "train_loss_last100": sum(losses) / len(losses) if losses else None,  # steps: 0: no loss
        "last_k": min(tc.last_k, len(losses)), "final_train_loss": losses[-1] if losses else None,
        "heldout_loss": held, "train_seconds": round(elapsed, 3),
        "tokens_per_s": steps * tokens_per_step / elapsed if elapsed else None,
        "flops_per_token": flops_tok, "fixed_flops_per_step": fixed_flops,
        "train_flops": flops_tok * steps * tokens_per_step + fixed_flops * steps,
        "world_size": env.world, "parallel": tc.parallel, "memory_per_rank": memory,
        "device": str(env.device), "torch": torch.__version__,
        "resumed_from": start, "checkpoint_problems": problems, **info,
        **({"fsdp_mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}}
           if getattr(par, "mp_policy", None) is not None else {}),
        "memory_plan": memory_plan.record_plan(spec, env.world, str(env.device)),  # beside the measured peak
        **memory_plan.measured_peak(env.device), **(provenance or {}),
    }
    record = _finite_record(record)
    if env.main:
        with interrupts.deferred():  # a signal now is acted on once the run is recorded
            export_model(export, tokenizer, paths.model, card=(to_dict(spec), record, card_name),
                         lineage=lineage)
            record["export_path"] = str(paths.model)
            from pcbench.util import outputs

            record["export_sha256"] = outputs.output_digest(outputs.read_marker(paths.model))
            if lineage is not None:
                record["lineage"] = lineage
            record["wall_seconds"] = round(time.time() - t0, 3)
            write_json(paths.final, record)
    tracker.finish(record)
    distributed.barrier(env)
    return record


def _finite_record(record: Any, where: str = "") -> Any:
    """`record` with every NaN/inf number replaced by null (JSON has neither: `final.json` stays
    valid JSON), each named in one warning line (a value that should have been a number)."""
    if isinstance(record, dict):
        return {k: _finite_record(v, f"{where}.{k}" if where else str(k)) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [_finite_record(v, f"{where}[{i}]") for i, v in enumerate(record)]
    if isinstance(record, float) and not math.isfinite(record):
        warn(f"final record: {where} is {record} (not a number JSON can hold); recorded as null")
        return None
    return record


def _stop_requested(env: distributed.DistEnv) -> bool:
    """Did a signal ask to stop? (Agreed by every process, so all stop after the same step.)"""
    flag = interrupts.requested() is not None
    if env.world > 1:
        flag = bool(distributed.all_mean(torch.tensor(float(flag), device=env.device), env) > 0)
    return flag


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def export_model(model, tokenizer, out: Path, what: str = "export", card: Optional[tuple] = None,
                 lineage: Optional[str] = None) -> None:
    """Save a stock HF checkpoint (config + safetensors + tokenizer), marked as a pcbench `model`;
    with `card` = (spec dict, final record, run name), its model card (`pcbench.card`) as README.md.

    Written into a temp dir next to `out` (removed whatever happens), then installed: `out` may be
    missing, empty or an earlier pcbench model (its own files are replaced, others kept); anything
    else raises `outputs.OutputError` naming `what`, and nothing is written."""
    from pcbench.util import outputs

    out = Path(out)
    outputs.claim(out, "model", what)
    with outputs.staging(out) as tmp:
        model.config.use_cache = True
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config.use_cache = False
        tokenizer.save_pretrained(tmp)
        if card is not None:
            from pcbench import card as model_card

            model_card.write(tmp, *card)
            model_card.keep_users_card(tmp, out)
        outputs.install(tmp, out, "model", what, **({"lineage": lineage} if lineage else {}))

