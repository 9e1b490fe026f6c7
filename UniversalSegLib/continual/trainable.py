"""Which parameters an extension trains, and keeping the frozen ones exactly as they were.

Modes: `heads` trains only the new classes' LPG rows; `heads+decoder` adds the backbone's decoder
and the per-voxel feature head; `all` trains everything (old LPG rows included). The per-class LPG
stores all classes in stacked tensors, so freezing the old classes means freezing rows of a
parameter: their gradients are zeroed by a hook (keeping clipping norms and optimiser moments
clean) and their values are restored after every optimiser step (weight decay would otherwise
shrink them), which keeps them bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from UniversalSegLib.errors import InputError
from UniversalSegLib.model import PerClassLPG, UniversalModel

TRAIN_MODES = ("heads", "heads+decoder", "all")

# Parameter-name prefixes of each backbone's decoder path (encoder and bottleneck excluded).
DECODER_PREFIXES: dict[str, tuple[str, ...]] = {
    "segresnet": ("backbone.net.up_layers.", "backbone.net.up_samples."),
    "swinunetr": ("backbone.net.decoder",),
    "unet_genesis": ("backbone.up_tr",),
}


def _is_trainable(name: str, mode: str, backbone: str) -> bool:
    if name.startswith("lpg."):
        return True  # old rows are masked by RowFreezer unless mode == "all"
    if mode == "all":
        return True
    if mode == "heads+decoder":
        return name.startswith("voxel_feature_head.") or name.startswith(DECODER_PREFIXES[backbone])
    return False


def check_mode(mode: str, model: UniversalModel, backbone: str) -> None:
    """Refuse modes the model cannot support, with a message that says what to do instead."""
    if mode not in TRAIN_MODES:
        raise InputError(f"unknown training mode {mode!r}; use one of {', '.join(TRAIN_MODES)}")
    if mode == "heads+decoder" and backbone not in DECODER_PREFIXES:
        raise InputError(f"'heads+decoder' does not know the decoder of backbone {backbone!r}; use 'heads' or 'all'")
    if mode == "heads" and not isinstance(model.lpg, PerClassLPG):
        raise InputError("this model's parameter generator is shared by all classes, so it has no per-class "
                         "heads to train alone; use 'heads+decoder' or 'all'")


class RowFreezer:
    """Keeps some rows (classes) of the stacked per-class LPG tensors fixed while training.

    Args:
        lpg: the model's parameter generator (a shared one has no rows to freeze: nothing is kept).
        frozen: rows [0, frozen) when an int (an extension's old classes), else the row indices.
    """

    def __init__(self, lpg: nn.Module, frozen: int | Sequence[int]):
        self.params = [p for p in lpg.parameters() if isinstance(lpg, PerClassLPG)]
        self.rows = torch.arange(frozen) if isinstance(frozen, int) else torch.as_tensor(list(frozen), dtype=torch.long)
        self._saved = [p.detach()[self.rows.to(p.device)].clone() for p in self.params]
        self._hooks = [p.register_hook(self._mask_grad) for p in self.params]

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[self.rows.to(grad.device)] = 0
        return grad

    @torch.no_grad()
    def restore(self) -> None:
        """Undo any change to the frozen rows (call after each optimiser step)."""
        for p, saved in zip(self.params, self._saved):
            p.index_copy_(0, self.rows.to(p.device), saved)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@contextmanager
def trainable(model: UniversalModel, mode: str, backbone: str, first_new: int) -> Iterator[tuple[list, RowFreezer]]:
    """Set requires_grad for `mode`; yields (trainable parameters, row freezer) and restores flags after.

    `mode="warmup"` is `heads` (only the new LPG rows). Parameters outside the mode get
    requires_grad=False, so autograd records nothing for them (a frozen encoder costs no backward).
    """
    effective = "heads" if mode == "warmup" else mode
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(_is_trainable(name, effective, backbone))
        if p.requires_grad:
            params.append(p)
    freezer = RowFreezer(model.lpg, first_new if effective != "all" else 0)
    try:
        yield params, freezer
    finally:
        freezer.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def frozen_backbone(mode: str) -> bool:
    """True when nothing before the LPG trains, so backbone features can be computed once and reused."""
    return mode in ("heads", "warmup")
