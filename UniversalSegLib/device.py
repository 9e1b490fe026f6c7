"""Which torch device a command or call runs on: one rule for predict, cohorts, training and extension."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from UniversalSegLib.errors import InputError

if TYPE_CHECKING:
    from UniversalSegLib.train.distributed import DistInfo


def resolve_device(device: str | torch.device | None = "auto", dist: DistInfo | None = None) -> torch.device:
    """The torch device for a request; asking for an absent CUDA, or a name torch does not know, is a user error.

    Args:
        device: "auto" (or None): CUDA when available, else the CPU; "cpu", "cuda", "cuda:N" or a torch.device.
        dist: this process's place in a `torchrun` job (training, cohorts). When given, a CUDA device is
            pinned to this process (`torch.cuda.set_device`) and a bare "cuda" means this rank's GPU
            (LOCAL_RANK under DDP, the current one otherwise).
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "cuda" and dist is not None:
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev
