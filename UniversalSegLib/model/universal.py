"""The assembled Universal Model: backbone -> two taps -> LPG -> dynamic class heads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from UniversalSegLib.model.backbones import build_backbone
from UniversalSegLib.model.heads import (
    HEAD_CHANNELS,
    IMAGE_FEATURE_DIM,
    PerClassLPG,
    SharedControllerLPG,
    apply_dynamic_heads,
)

LPG_VARIANTS = {"per_class": PerClassLPG, "shared": SharedControllerLPG}


HEAD_NORM_GROUPS = 16  # the published heads' GroupNorm


def _norm_relu_conv(channels: int, out: int, pool: bool = False) -> nn.Sequential:
    """GroupNorm(16) -> ReLU -> [global average pool] -> Conv1x1, indexed like the published heads.

    A backbone with fewer or other channels than a multiple of 16 (SegResNet `init_filters: 8`)
    gets gcd(16, channels) groups instead: GroupNorm has no per-group parameters, so the weights'
    shapes and every model whose channels are a multiple of 16 are unchanged.
    """
    groups = math.gcd(HEAD_NORM_GROUPS, channels)
    layers: list[nn.Module] = [nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.AdaptiveAvgPool3d(1))
    layers.append(nn.Conv3d(channels, out, kernel_size=1))
    return nn.Sequential(*layers)


class UniversalModel(nn.Module):
    """CLIP-driven Universal Model (Liu et al. 2023) with a pluggable backbone.

    `forward(x, classes)` returns per-class logits (B, n, *spatial); apply a sigmoid per class
    (never softmax: classes overlap). `classes` is an optional list of indices into the model's
    class list; only those heads are computed.
    """

    def __init__(self, backbone: str, backbone_config: dict[str, Any] | None, class_embeddings: torch.Tensor,
                 lpg: str = "per_class", lpg_hidden: int = 512, head_class_chunk: int = 8):
        super().__init__()
        if lpg not in LPG_VARIANTS:
            raise ValueError(f"unknown LPG variant {lpg!r}; use one of {list(LPG_VARIANTS)}")
        self.backbone = build_backbone(backbone, backbone_config)
        self.image_feature_head = _norm_relu_conv(self.backbone.deep_channels, IMAGE_FEATURE_DIM, pool=True)
        self.voxel_feature_head = _norm_relu_conv(self.backbone.voxel_channels, HEAD_CHANNELS)
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        num_classes, embed_dim = class_embeddings.shape
        kwargs = {"hidden": lpg_hidden} if lpg == "per_class" else {}
        self.lpg = LPG_VARIANTS[lpg](num_classes, embed_dim, **kwargs)
        self.head_class_chunk = head_class_chunk

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    @property
    def patch_multiple(self) -> int:
        return self.backbone.patch_multiple

    def class_index(self, classes: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        device = self.class_embeddings.device
        if classes is None:
            return torch.arange(self.num_classes, device=device)
        return torch.as_tensor(classes, dtype=torch.long, device=device)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global image feature (B, 256) and 8-channel voxel feature (B, 8, *spatial)."""
        deep, voxel = self.backbone(x)
        return self.image_feature_head(deep).flatten(1), self.voxel_feature_head(voxel)

    def head_parameters(self, image_feature: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.lpg(image_feature, self.class_embeddings[idx], idx)

    def forward(self, x: torch.Tensor, classes: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        idx = self.class_index(classes)
        image_feature, voxel_feature = self.features(x)
        params = self.head_parameters(image_feature, idx)
        return apply_dynamic_heads(voxel_feature, params, self.head_class_chunk)

    @torch.no_grad()
    def add_classes(self, embeddings: torch.Tensor, init_from: list[int | None] | None = None) -> None:
        """Append classes: their embeddings and (per-class LPG) one new MLP each."""
        emb = embeddings.to(self.class_embeddings)
        self.class_embeddings = torch.cat([self.class_embeddings, emb])
        self.lpg.grow(emb.shape[0], init_from)
