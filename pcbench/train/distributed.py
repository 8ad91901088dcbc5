"""torch.distributed setup from the environment (torchrun, submitit or our own spawner)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pcbench.util.devices import resolve_device


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator(device, environ=None) -> bool:
    """CUDA training processes: `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (segments grow in
    place instead of fragmenting into fixed blocks; torchtitan, the GPU check), unless the user set
    it (or PYTORCH_ALLOC_CONF). Applied before the allocator starts, or at once if it already has.
    Returns whether it was set here."""
    environ = os.environ if environ is None else environ
    if torch.device(device).type != "cuda" or "PYTORCH_CUDA_ALLOC_CONF" in environ or "PYTORCH_ALLOC_CONF" in environ:
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings(ALLOC_CONF)
    return True


def setup(device_pref: str = "auto", group: bool = False) -> DistEnv:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
    (nccl on CUDA, gloo on CPU); a single process when WORLD_SIZE is unset or 1, which still gets
    a one-rank group (an in-memory store) with `group` (FSDP and DCP need one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank, "train.device")  # cuda:<local_rank> or the CPU
    configure_cuda_allocator(device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    elif group and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                store=dist.HashStore())
    return DistEnv(rank, world, local_rank, device)


def all_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in one process)."""
    if env.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= env.world
    return x


def all_gather_object(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order (`[obj]` in one process)."""
    if env.world == 1:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()

