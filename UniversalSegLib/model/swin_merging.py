"""The Swin patch-merging variant the published Universal Model checkpoints were trained with.

Patch merging gathers the 8 voxels of each 2x2x2 block into one token (8*C channels, LayerNorm,
then a linear map to 2*C). The reference code carries its own copy of MONAI 0.9's 3D layer, whose
8 gathered sub-grids are, as (depth, height, width) offsets, in this order:
(0,0,0), (1,0,0), (0,1,0), (0,0,1), (1,0,1), (0,1,0), (0,0,1), (1,1,1) -- two of them twice and
(1,1,0), (0,1,1) never (MONAI issues #4757, #8284). The installed MONAI's "merging" layer now takes
the 8 distinct sub-grids and its "mergingv2" takes them in yet another order, so neither reproduces
the trained weights' numbers although all three have the same parameter names and shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMergingV2

REFERENCE_3D_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))


class ReferencePatchMerging(PatchMergingV2):
    """3D patch merging with the reference's gather order (parameters as MONAI's: `reduction`, `norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:  # 2D has no historical variant: MONAI's own order
            return super().forward(x)
        d, h, w = x.shape[1:4]
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in REFERENCE_3D_OFFSETS], -1)
        return self.reduction(self.norm(x))


# Names a model file's `backbone_config["downsample"]` may use besides MONAI's own.
SWIN_DOWNSAMPLE_LAYERS = {"merging_reference": ReferencePatchMerging}
