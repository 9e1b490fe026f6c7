"""The language-driven parameter generator (LPG) and the class-specific dynamic head (CSH).

Each class's head is three dynamic 1x1x1 convolutions 8->8->8->1 whose 153 numbers come from
the LPG: weights first (64, 64, 8), then biases (8, 8, 1), each weight block output-channel-major
(w[o, i] = v[8*o + i]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_CHANNELS = 8
HEAD_WEIGHT_SIZES = (HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS)
HEAD_BIAS_SIZES = (HEAD_CHANNELS, HEAD_CHANNELS, 1)
HEAD_PARAMS = sum(HEAD_WEIGHT_SIZES) + sum(HEAD_BIAS_SIZES)  # 153
IMAGE_FEATURE_DIM = 256
# Classes per step of a text-folded LPG: its float16 weights are widened to float32 per step, and all
# 46 classes at once made 38 MB of temporaries per window (8 classes: 7 MB).
FOLDED_LPG_CLASS_CHUNK = 8


class PerClassLPG(nn.Module):
    """Journal version: one independent two-layer MLP per class.

    Input per (sample, class): [global image feature (256) ++ class text embedding (E)];
    Conv1x1(256+E -> hidden) -> ReLU -> Conv1x1(hidden -> 153). The MLPs are stored stacked
    (class-major) so all classes of all samples run in one einsum; `w1` is kept as one
    (N, hidden, 256+E) tensor so each class owns exactly the parameters of its own MLP.
    """

    def __init__(self, num_classes: int, embed_dim: int, hidden: int = 512,
                 image_dim: int = IMAGE_FEATURE_DIM):
        super().__init__()
        self.image_dim, self.embed_dim, self.hidden = image_dim, embed_dim, hidden
        in_dim = image_dim + embed_dim
        self.w1 = nn.Parameter(torch.empty(num_classes, hidden, in_dim))
        self.b1 = nn.Parameter(torch.empty(num_classes, hidden))
        self.w2 = nn.Parameter(torch.empty(num_classes, HEAD_PARAMS, hidden))
        self.b2 = nn.Parameter(torch.empty(num_classes, HEAD_PARAMS))
        self.text_part: torch.Tensor | None = None  # set by `fold_text`
        self.reset_parameters(range(num_classes))

    @property
    def num_classes(self) -> int:
        return self.w1.shape[0]

    @staticmethod
    def params_per_class(embed_dim: int, hidden: int = 512, image_dim: int = IMAGE_FEATURE_DIM) -> int:
        return (image_dim + embed_dim) * hidden + hidden + hidden * HEAD_PARAMS + HEAD_PARAMS

    @torch.no_grad()
    def reset_parameters(self, rows) -> None:
        """Default Conv1d initialisation (Kaiming-uniform with a=sqrt(5)), per class."""
        for r in rows:
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                bound = 1.0 / w.shape[2] ** 0.5
                w[r].uniform_(-bound, bound)
                b[r].uniform_(-bound, bound)

    def forward(self, image_feature: torch.Tensor, text: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """image_feature (B, 256), text (n, E), idx (n,) -> head parameters (B, n, 153)."""
        if self.text_part is not None and len(idx) > FOLDED_LPG_CLASS_CHUNK:
            step = FOLDED_LPG_CLASS_CHUNK
            return torch.cat([self(image_feature, text[s:s + step], idx[s:s + step])
                              for s in range(0, len(idx), step)], 1)
        w1 = self.w1[idx].float()  # a folded LPG keeps its weights in float16: computed in float32
        img_part = torch.einsum("nhc,bc->bnh", w1[:, :, : self.image_dim], image_feature)
        if self.text_part is not None:  # folded for inference
            txt_part = self.text_part[idx]
        else:
            txt_part = torch.einsum("nhc,nc->nh", w1[:, :, self.image_dim:], text) + self.b1[idx]
        hidden = F.relu(img_part + txt_part.unsqueeze(0))
        return torch.einsum("nph,bnh->bnp", self.w2[idx].float(), hidden) + self.b2[idx]

    @torch.no_grad()
    def fold_text(self, text: torch.Tensor, weight_dtype: torch.dtype = torch.float16) -> None:
        """Inference only: precompute every class's text term and drop the text columns of `w1`.

        The text half of the first layer is a constant per class; folding it leaves 2/3 of `w1`
        out of memory (0.8 instead of 1.9 MB per class at hidden 512 with CLIP's 512-d text).
        The remaining weight matrices are then kept in `weight_dtype` (float16: half again; exact
        for models stored in float16, like the bundled one, else rounded as the voxel features
        are) and computed in float32; the text terms and biases stay float32.
        The module can no longer be trained, grown or saved afterwards.
        """
        if self.text_part is None:
            self.text_part = torch.einsum("nhc,nc->nh", self.w1[:, :, self.image_dim:], text) + self.b1
            self.w1 = nn.Parameter(self.w1[:, :, : self.image_dim].to(weight_dtype), requires_grad=False)
            self.w2 = nn.Parameter(self.w2.detach().to(weight_dtype), requires_grad=False)

    @torch.no_grad()
    def grow(self, count: int, init_from: list[int | None] | None = None) -> None:
        """Append `count` new class MLPs, each fresh or copied from an existing class."""
        if self.text_part is not None:
            raise RuntimeError("a text-folded LPG is for inference only and cannot grow")
        old = self.num_classes
        for name in ("w1", "b1", "w2", "b2"):
            p = getattr(self, name)
            setattr(self, name, nn.Parameter(torch.cat([p.data, p.data.new_empty(count, *p.shape[1:])])))
        self.reset_parameters(range(old, old + count))
        for i, src in enumerate(init_from or []):
            if src is not None:
                for name in ("w1", "b1", "w2", "b2"):
                    getattr(self, name)[old + i] = getattr(self, name)[src]


class SharedControllerLPG(nn.Module):
    """ICCV version: text -> Linear(E->256)+ReLU, then ONE shared Conv1x1(512->153) for all classes.

    Module names (`text_to_vision`, `controller`) follow the published checkpoints.
    """

    def __init__(self, num_classes: int, embed_dim: int, image_dim: int = IMAGE_FEATURE_DIM):
        super().__init__()
        self.text_to_vision = nn.Linear(embed_dim, image_dim)
        self.controller = nn.Conv3d(2 * image_dim, HEAD_PARAMS, kernel_size=1)

    def forward(self, image_feature: torch.Tensor, text: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        txt = F.relu(self.text_to_vision(text))  # (n, 256)
        b, n = image_feature.shape[0], txt.shape[0]
        x = torch.cat([image_feature.unsqueeze(1).expand(b, n, -1), txt.unsqueeze(0).expand(b, n, -1)], -1)
        w = self.controller.weight.flatten(1)  # (153, 512)
        return x @ w.T + self.controller.bias

    def grow(self, count: int, init_from=None) -> None:
        """The shared controller has nothing per class: new classes only add an embedding."""


def split_head_params(params: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(..., 153) -> weights [(...,8,8), (...,8,8), (...,1,8)] and biases [(...,8), (...,8), (...,1)]."""
    sizes = [*HEAD_WEIGHT_SIZES, *HEAD_BIAS_SIZES]
    chunks = torch.split(params, sizes, dim=-1)
    lead = params.shape[:-1]
    weights = [chunks[0].reshape(*lead, 8, 8), chunks[1].reshape(*lead, 8, 8), chunks[2].reshape(*lead, 1, 8)]
    return weights, list(chunks[3:])


def apply_dynamic_heads(feature: torch.Tensor, params: torch.Tensor, class_chunk: int = 8) -> torch.Tensor:
    """Run every (sample, class) head on the 8-channel voxel feature in batched matmuls.

    feature (B, 8, *spatial), params (B, n, 153) -> logits (B, n, *spatial). No loop over the
    batch and no n-fold copy of the feature map: layer 1 is one (n*8 x 8) matmul per sample,
    layers 2-3 are block-diagonal and run as a bmm over (sample, class). Classes go in chunks
    of `class_chunk` to bound the (B, chunk*8, voxels) hidden activations (small chunks are
    also faster on CPU: they stay in cache).
    """
    b, c, *spatial = feature.shape
    flat = feature.reshape(b, c, -1)
    voxels = flat.shape[-1]
    weights, biases = split_head_params(params)
    outputs = []
    for s in range(0, params.shape[1], class_chunk):
        sl = slice(s, s + class_chunk)
        n = weights[0][:, sl].shape[1]
        h = torch.baddbmm(biases[0][:, sl].reshape(b, n * c, 1), weights[0][:, sl].reshape(b, n * c, c), flat)
        h = F.relu(h).reshape(b * n, c, voxels)
        h = F.relu(torch.baddbmm(biases[1][:, sl].reshape(b * n, c, 1), weights[1][:, sl].reshape(b * n, c, c), h))
        h = torch.baddbmm(biases[2][:, sl].reshape(b * n, 1, 1), weights[2][:, sl].reshape(b * n, 1, c), h)
        outputs.append(h.reshape(b, n, voxels))
    return torch.cat(outputs, 1).reshape(b, -1, *spatial)
