"""Synthetic partially labelled data and tiny models: for tests, benchmarks and smoke runs of the loop.

Each sample is a patch with one bright ellipsoid per class (class k has its own intensity), the
full multi-hot label, and the `annotated` flags of the synthetic dataset it belongs to, so the
loop sees exactly the structure real partially labelled datasets give it. Items are a pure
function of (seed, index): resumed and distributed runs see reproducible data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from UniversalSegLib.model import UniversalModel
from UniversalSegLib.registry import default_registry
from UniversalSegLib.store import Manifest, Preprocessing

TINY_BACKBONE = {"init_filters": 16, "blocks_down": [1, 1], "blocks_up": [1], "num_groups": 8}


class SyntheticPartialDataset(Dataset):
    """`length` samples cycling through `datasets` (name -> indices of the classes it annotates)."""

    def __init__(self, datasets: Mapping[str, Sequence[int]], num_classes: int, patch_size: Sequence[int] = (32,) * 3,
                 length: int = 16, seed: int = 0):
        self.names = list(datasets)
        self.annotated = {n: np.isin(np.arange(num_classes), list(c)) for n, c in datasets.items()}
        self.num_classes, self.patch_size = num_classes, tuple(patch_size)
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, index))
        name = self.names[index % len(self.names)]
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in self.patch_size], indexing="ij"), -1).astype(np.float32)
        image = rng.normal(0.1, 0.05, self.patch_size).astype(np.float32)
        label = np.zeros((self.num_classes, *self.patch_size), np.float32)
        for k in range(self.num_classes):
            centre = rng.uniform(0.25, 0.75, 3) * np.array(self.patch_size)
            radii = rng.uniform(0.1, 0.2, 3) * np.array(self.patch_size)
            inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
            label[k] = inside
            image[inside] += 0.15 * (k + 1)
        return {"image": image[None], "label": label, "annotated": self.annotated[name].copy(),
                "dataset": name, "case": f"{name}_{index}"}


def tiny_model(class_keys: Sequence[str], seed: int = 0, lpg_hidden: int = 32, embed_dim: int = 16,
               patch_size: Sequence[int] = (32,) * 3, name: str = "tiny") -> tuple[UniversalModel, Manifest]:
    """A small segresnet Universal Model with random class embeddings (no text encoder needed)."""
    registry = default_registry()
    classes = [registry.resolve(k) for k in class_keys]
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(len(classes), embed_dim, generator=generator), dim=1)
    torch.manual_seed(seed)
    model = UniversalModel("segresnet", dict(TINY_BACKBONE), embeddings, lpg="per_class", lpg_hidden=lpg_hidden)
    manifest = Manifest(name=name, backbone="segresnet", backbone_config=dict(TINY_BACKBONE), classes=classes,
                        lpg="per_class", lpg_hidden=lpg_hidden, text_encoder="random:synthetic",
                        preprocessing=Preprocessing(patch_size=list(patch_size)))
    return model, manifest
