"""Helpers only tests (and the benchmarks that need test data) use: kept out of the package users install.

- `write_dicom_series`: a 3D image as a DICOM CT series, to test DICOM input and SEG output.
- `SyntheticPartialDataset`, `tiny_model`: synthetic partially labelled data and a tiny model for the
  training loop. Each sample is a patch with one bright ellipsoid per class (class k has its own
  intensity), the full multi-hot label, and the `annotated` flags of the synthetic dataset it belongs
  to; items are a pure function of (seed, index), so resumed and distributed runs see the same data.
- `published_layout`: our state dict spelled as the CLIP-Driven Universal Model's published files spell it.

Tests import it as `support` (pytest puts Testing/ on sys.path); benchmarks as `Testing.support`, run
from the repository root (`python -m benchmarks.bench_training`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from UniversalSegLib.importers.clip_driven_universal import BACKBONES, _ours_to_published
from UniversalSegLib.io.atomic import atomic_dir
from UniversalSegLib.model import UniversalModel
from UniversalSegLib.registry import default_registry
from UniversalSegLib.store import Manifest, Preprocessing

# --- DICOM series ---------------------------------------------------------------------------------

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(image: sitk.Image, folder: str | os.PathLike, patient_id: str = "ANON",
                       patient_name: str = "Anonymous^", series_description: str = "CT") -> list[Path]:
    """Write `image` (HU, any orientation) as a CT series of int16 slices in `folder`; returns the files in order.

    The folder is written atomically (it appears complete or not at all) and replaced if it exists.
    """
    from pydicom.uid import generate_uid

    array = sitk.GetArrayViewFromImage(image)
    if array.min() < np.iinfo(np.int16).min or array.max() > np.iinfo(np.int16).max:
        raise ValueError("image values do not fit DICOM int16 pixels")
    volume = sitk.Cast(sitk.Round(image) if np.issubdtype(array.dtype, np.floating) else image, sitk.sitkInt16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1]))
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    common = {
        "0008|0008": "DERIVED\\SECONDARY\\AXIAL", "0008|0016": CT_IMAGE_STORAGE, "0008|0020": now[0],
        "0008|0030": now[1], "0008|0060": "CT", "0008|103e": series_description, "0010|0010": patient_name,
        "0010|0020": patient_id, "0020|000d": generate_uid(), "0020|000e": generate_uid(), "0020|0010": "1",
        "0020|0011": "1", "0020|0052": generate_uid(), "0020|0037": orientation,
        "0018|0050": f"{image.GetSpacing()[2]:.10g}", "0028|1052": "0", "0028|1053": "1", "0028|1054": "HU",
    }
    folder = Path(folder)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # use our UIDs instead of GDCM's
    names = [f"slice_{k:04d}.dcm" for k in range(volume.GetSize()[2])]
    with atomic_dir(folder) as tmp:
        for k, name in enumerate(names):
            slice_ = volume[:, :, k]
            tags = {**common, "0008|0018": generate_uid(), "0020|0013": str(k + 1),
                    "0020|0032": "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))}
            for key, value in tags.items():
                slice_.SetMetaData(key, value)
            writer.SetFileName(str(tmp / name))
            writer.Execute(slice_)
    return [folder / name for name in names]


# --- synthetic training data and a tiny model -----------------------------------------------------

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


# --- published checkpoint layout ------------------------------------------------------------------

def published_layout(state: Mapping[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """Our state dict spelled as the published file spells it (`module.`, bare Swin names)."""
    spec = BACKBONES[backbone]
    out = {}
    for name, value in state.items():
        theirs = _ours_to_published(name, spec)
        if spec.bare_names is not None and spec.bare_names.match(theirs.removeprefix("backbone.")):
            theirs = theirs.removeprefix("backbone.")
        out["module." + theirs] = value
    return out
