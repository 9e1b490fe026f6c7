"""Distributed data-parallel set-up from the environment `torchrun` provides.

`torchrun --nproc_per_node N -m UniversalSegLib train CONFIG` sets WORLD_SIZE, RANK and
LOCAL_RANK (and MASTER_ADDR/PORT); a plain `universalseg train` sets none and runs as a single
process. The backend follows the device: NCCL on CUDA, gloo on CPU. Each rank drives one GPU
(its LOCAL_RANK) or the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from UniversalSegLib.errors import UniversalSegError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Read WORLD_SIZE / RANK / LOCAL_RANK (absent: a single process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise UniversalSegError(f"malformed torchrun environment: {e}") from None
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); nothing to do for a single process."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

