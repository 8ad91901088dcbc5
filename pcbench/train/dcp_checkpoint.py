"""Sharded training checkpoints (torch.distributed.checkpoint) for `train.parallel: fsdp`.

Same layout and guarantees as `pcbench.train.checkpoint`: `<ckpt_root>/step_00000100/` appears by
rename only once complete, and holds a `manifest.json` (size + sha256 of every file) that
`checkpoint.verify` checks. Inside: DCP's shard files and `.metadata` (the trainable's and the
optimiser's state, each rank writing its own shards, from `get_state_dict`), and `extra.pt` (the
scheduler, RNG state, step, losses, elapsed time) written by the main process. On resume the main
process picks the newest valid checkpoint (a corrupt one is renamed aside, never deleted), every
rank loads its shards (DCP reshards when the world size changed).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from pcbench.train import checkpoint
from pcbench.util.atomic import write_json
from pcbench.util.verify import sha256_file
from pcbench.train.distributed import DistEnv, barrier

def _hash_files(path: Path, files) -> dict[str, dict]:
    """{name relative to `path`: {bytes, sha256}} of `files` (the one hashing helper, `util.verify`)."""
    return {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": sha256_file(f, cache=False)}
            for f in sorted(files)}


def own_shards(path: Path, rank: int) -> list[Path]:
    """The shard files rank `rank` wrote (DCP's FileSystemWriter names them `__<rank>_<n>.distcp`)."""
    return [p for p in path.glob(f"__{rank}_*.distcp") if p.is_file()]


def _manifest(path: Path, step: int, parts: list[dict[str, dict]], owner: Optional[str] = None) -> None:
    """Merge every rank's hashes of its own shards (`parts`, in rank order) with the main process's
    of the rest (`.metadata`, `extra.pt`), and write the manifest (`hashed_by`: which rank read what;
    `owner`: the lineage the checkpoint belongs to)."""
    files, by = {}, {}
    for rank, part in enumerate(parts):
        for name, meta in part.items():
            files[name] = meta
            by[name] = rank
    rest = [p for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)) not in files]
    for name, meta in _hash_files(path, rest).items():
        files[name] = meta
        by[name] = 0
    write_json(path / "manifest.json", {"step": step, "format": "dcp", "files": dict(sorted(files.items())),
                                        "hashed_by": dict(sorted(by.items())),
                                        **({"owner": owner} if owner is not None else {})})


def save(root: Path, step: int, trainable, opt, extra: dict[str, Any], env: DistEnv, keep: int = 2,
         owner: Optional[str] = None) -> Path:
    """Every rank writes its shards of checkpoint `step`; the main process adds `extra`, the
    manifest, renames it into place and keeps the newest `keep`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if env.main:
        root.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep_partial(root)  # a dead writer's, or an earlier failed write's
        tmp.mkdir()
    barrier(env)
    try:
        model_sd, optim_sd = get_state_dict(trainable, opt)
        dcp.save({"trainable": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        del model_sd, optim_sd
        # Every rank hashes the shards it wrote, in parallel; the main process merges (no rank reads
        # another's files, and nothing long runs inside a barrier while the others wait).
        mine = _hash_files(tmp, own_shards(tmp, env.rank))
        parts = [mine]
        if env.world > 1:
            parts = [None] * env.world
            dist.all_gather_object(parts, mine)
        if env.main:
            with open(tmp / "extra.pt", "wb") as f:
                torch.save(extra, f)
                f.flush()
                os.fsync(f.fileno())
            _manifest(tmp, step, parts, owner)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint.list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if env.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(env)
    return final


def load_latest(root: Path, trainable, opt, env: DistEnv,
                owner: Optional[str] = None) -> tuple[Optional[dict[str, Any]], list[str]]:
    """Load the newest valid checkpoint's shards into `trainable` and `opt` on every rank; returns
    its `extra` (None when there is none) and the problems found. Raises CorruptCheckpoint when
    checkpoints exist but none is valid."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    choice: list = [None, [], None]  # path, problems, error: the main process decides for all
    if env.main:
        try:
            path, problems = checkpoint.newest_valid(root, owner)
            choice = [None if path is None else str(path), problems, None]
        except checkpoint.CorruptCheckpoint as e:
            choice = [None, [], str(e)]
    if env.world > 1:
        dist.broadcast_object_list(choice, src=0)
    path, problems, error = choice
    if error is not None:
        raise checkpoint.CorruptCheckpoint(error)
    if path is None:
        return None, problems
    model_sd, optim_sd = get_state_dict(trainable, opt)
    state = {"trainable": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(trainable, opt, model_state_dict=state["trainable"], optim_state_dict=state["optimizer"])
    extra = torch.load(Path(path) / "extra.pt", map_location="cpu", weights_only=False)
    return extra, problems
