"""Backbones: MONAI networks behind one small interface.

Every backbone returns `(deep, voxel)`: the deepest encoder feature map (for the global image
feature) and the last decoder feature map at full input resolution (for the per-voxel feature).
`deep_channels` and `voxel_channels` tell the heads what to expect; `patch_multiple` is the
factor every spatial input size must be divisible by.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.networks.nets import SegResNet, SwinUNETR
from torch import nn

from UniversalSegLib.model.swin_merging import SWIN_DOWNSAMPLE_LAYERS


class Backbone(nn.Module):
    """Interface: forward(x) -> (deep feature map, full-resolution voxel feature map)."""

    deep_channels: int
    voxel_channels: int
    patch_multiple: int

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class SegResNetBackbone(Backbone):
    """MONAI SegResNet (Myronenko 2018) without its final conv: small and CPU-friendly.

    GroupNorm throughout, so statistics never mix across samples or datasets.
    """

    def __init__(self, init_filters: int = 16, blocks_down: tuple[int, ...] = (1, 2, 2, 4),
                 blocks_up: tuple[int, ...] = (1, 1, 1), num_groups: int = 8, in_channels: int = 1):
        super().__init__()
        self.net = SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=in_channels,
                             out_channels=1, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up),
                             norm=("GROUP", {"num_groups": num_groups}), use_conv_final=False)
        del self.net.conv_final  # built even when unused; unused parameters would break DDP
        self.deep_channels = init_filters * 2 ** (len(blocks_down) - 1)
        self.voxel_channels = init_filters
        self.patch_multiple = 2 ** (len(blocks_down) - 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # SegResNet.decode's arithmetic, but each skip is released once added (and added in place when
        # no gradient is recorded): the full-resolution skip no longer lives through the last, most
        # memory-hungry up block (-60 MB peak per 96^3 window at init_filters 16).
        deep, skips = self.net.encode(x)
        skips.pop()  # the deepest is `deep` itself
        x = deep
        for up, up_layer in zip(self.net.up_samples, self.net.up_layers):
            x, skip = up(x), skips.pop()
            x = x + skip if torch.is_grad_enabled() else x.add_(skip)
            del skip
            x = up_layer(x)
        return deep, x


class SwinUNETRBackbone(Backbone):
    """MONAI Swin UNETR (Hatamizadeh 2022) without its `out` layer.

    Taps as in the Universal Model: `encoder10` on the deepest Swin stage (16*feature_size
    channels, 1/32 resolution) and the output of `decoder1` (feature_size channels, full size).
    Parameter names equal MONAI's, so published checkpoints map by a prefix.
    """

    def __init__(self, feature_size: int = 48, use_v2: bool = False, use_checkpoint: bool = False,
                 in_channels: int = 1, downsample: str = "merging"):
        super().__init__()
        net = SwinUNETR(in_channels=in_channels, out_channels=1, feature_size=feature_size,
                        use_v2=use_v2, use_checkpoint=use_checkpoint,
                        downsample=SWIN_DOWNSAMPLE_LAYERS.get(downsample, downsample))
        del net.out  # our class heads replace it
        self.net = net
        self.deep_channels = 16 * feature_size
        self.voxel_channels = feature_size
        self.patch_multiple = 32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        hidden = n.swinViT(x, n.normalize)
        enc0 = n.encoder1(x)
        enc1 = n.encoder2(hidden[0])
        enc2 = n.encoder3(hidden[1])
        enc3 = n.encoder4(hidden[2])
        deep = n.encoder10(hidden[4])
        dec = n.decoder5(deep, hidden[3])
        dec = n.decoder4(dec, enc3)
        dec = n.decoder3(dec, enc2)
        dec = n.decoder2(dec, enc1)
        return deep, n.decoder1(dec, enc0)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "segresnet": SegResNetBackbone,
    "swinunetr": SwinUNETRBackbone,
}


def register_backbone(name: str, factory: Callable[..., Backbone]) -> None:
    """Make a backbone available by name to model files and configs."""
    BACKBONES[name] = factory


def build_backbone(name: str, config: dict[str, Any] | None = None) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](**(config or {}))
