"""The 3D U-Net of the Models Genesis family, as used by the published Universal Model checkpoints.

Four down stages of two (3x3x3 conv -> norm -> ReLU) layers, 1->32->64, 64->64->128, 128->128->256,
256->256->512, with a 2x max-pool between stages and none after the last; three up stages, each a
2x2x2 transposed conv (same channel count) whose output is concatenated, before the skip, with the
matching down stage's output, then two conv layers (768->256->256, 384->128->128, 192->64->64).
Taps: the 512-channel bottleneck (1/8 resolution) and the 64-channel last up stage.

Module names (`down_tr64.ops.0.conv1`, `up_tr256.up_conv`, ...) follow the published checkpoints
so their state dicts load by name.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from UniversalSegLib.model.backbones import Backbone, register_backbone

BASE_CHANNELS = 32


class BatchStatsNorm3d(nn.BatchNorm3d):
    """BatchNorm that always normalises with the statistics of the input it is given.

    The published U-Net never uses running statistics, not even at inference (its norm calls
    batch_norm in training mode unconditionally), so its outputs depend on the current batch.
    Training mode: statistics over the whole batch, as the reference trained. Eval mode:
    statistics per sample, which equals the reference on one window at a time (how it runs its
    sliding window) and keeps our outputs independent of how many windows share a batch.
    The running-statistics buffers are kept (never read nor updated) so checkpoints load by name.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected a 5D input (B, C, D, H, W), got {x.dim()}D")
        if self.training:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class ConvNormReLU(nn.Module):
    """3x3x3 conv (with bias) -> BatchStatsNorm3d -> ReLU; attribute names as published."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = BatchStatsNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_relu(self.conv1(x))

    def norm_relu(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(x), inplace=True)  # in place: the norm's output is needed by nothing else


def _two_layers(in_channels: int, mid: int, out: int) -> nn.Sequential:
    return nn.Sequential(ConvNormReLU(in_channels, mid), ConvNormReLU(mid, out))


class DownStage(nn.Module):
    """Two conv layers; returns the pre-pool output (the skip) and, unless last, its 2x max-pool."""

    def __init__(self, in_channels: int, mid: int, out: int, pool: bool):
        super().__init__()
        self.ops = _two_layers(in_channels, mid, out)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


def upsample_2x(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """ConvTranspose3d(kernel 2, stride 2): each output voxel gets exactly one kernel tap, so each of
    the 8 taps is a 1x1x1 conv written into its own strided sub-grid of the output. Same sums as
    torch's transposed conv, without its full-size column buffer: on CPU it takes 2.7x less
    extra memory and runs 2x faster in the last stage (128 channels at 96^3)."""
    b, _, d, h, w = x.shape
    out = x.new_empty(b, weight.shape[1], 2 * d, 2 * h, 2 * w)
    for i, j, k in itertools.product(range(2), repeat=3):
        out[:, :, i::2, j::2, k::2] = F.conv3d(x, weight[:, :, i, j, k].t()[..., None, None, None], bias)
    return out


class UpStage(nn.Module):
    """2x2x2 transposed conv, concatenation [upsampled, skip] (in that order), two conv layers.

    Memory: the concatenation is never built; the first conv's input channels are split instead
    (conv(cat[u, s]) = conv_u(u) + conv_s(s)), which spares the largest activation of the network
    (192 x 96^3 floats, 680 MB, in the last stage) and equals the concatenated form up to float
    rounding.
    """

    def __init__(self, in_channels: int, skip_channels: int, out: int):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _two_layers(in_channels + skip_channels, out, out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        first, second = self.ops
        up = upsample_2x(x, self.up_conv.weight, self.up_conv.bias)
        weight, n = first.conv1.weight, up.shape[1]
        y = F.conv3d(up, weight[:, :n], first.conv1.bias, padding=1)
        del up  # frees the upsampled map before the skip's half runs
        y.add_(F.conv3d(skip, weight[:, n:], None, padding=1))
        return second(first.norm_relu(y))


class GenesisUNetBackbone(Backbone):
    """Models-Genesis-style 3D U-Net (19.4M parameters with the Universal Model heads)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        c = BASE_CHANNELS
        self.down_tr64 = DownStage(in_channels, c, 2 * c, pool=True)
        self.down_tr128 = DownStage(2 * c, 2 * c, 4 * c, pool=True)
        self.down_tr256 = DownStage(4 * c, 4 * c, 8 * c, pool=True)
        self.down_tr512 = DownStage(8 * c, 8 * c, 16 * c, pool=False)
        self.up_tr256 = UpStage(16 * c, 8 * c, 8 * c)
        self.up_tr128 = UpStage(8 * c, 4 * c, 4 * c)
        self.up_tr64 = UpStage(4 * c, 2 * c, 2 * c)
        self.deep_channels = 16 * c
        self.voxel_channels = 2 * c
        self.patch_multiple = 8

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, skip64 = self.down_tr64(x)
        x, skip128 = self.down_tr128(x)
        x, skip256 = self.down_tr256(x)
        deep, _ = self.down_tr512(x)
        x = self.up_tr256(deep, skip256)
        x = self.up_tr128(x, skip128)
        return deep, self.up_tr64(x, skip64)


register_backbone("unet_genesis", GenesisUNetBackbone)
