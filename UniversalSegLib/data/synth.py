"""Domain randomisation for training: CT synthesis from label maps and contrast-phase augmentation.

`SynthesizeFromLabels` draws a new CT from a sample's full anatomical label map in the spirit of
SynthSeg (Billot et al. 2023): every structure gets a random mean intensity from a plausible CT range
for its tissue and a random contrast phase, its own texture, then the whole image gets a bias field,
slice thickness, blur, noise and gamma. `ContrastPhaseAugment` changes the phase of a REAL image where
structures are labelled (the aorta of a native scan becomes arterial, the bright aorta of an
angiogram becomes native) and adds the usual intensity augmentation. `build_generalisation_pipeline`
composes both with the spatial transforms of `fov.py`.

Sample dicts follow `fov.py` (image in [0, 1] = HU window [-175, 250]). The `structure_map` uses the
TotalSegmentator v2 ids (1-117, `totalsegmentator_v2_label_names.json`, 0 = outside the body) plus
the ids of `EXTRA_STRUCTURES` (body, fat, gas, lung, bone and table where nothing is labelled, and
model classes that TotalSegmentator lacks). `build_structure_map` derives one from a real CT and its
label map; ids left at 0 inside the body are completed from the image at synthesis time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import gaussian_1d

from UniversalSegLib.data.fov import (
    ANNOTATED,
    IMAGE,
    LABEL,
    RAS_AXES,
    STRUCTURES,
    TABLE_ID,
    Axes,
    RandomDeformation,
    RandomFOVPad,
    RandomPartialOrgan,
    RandomSlab,
    RandomTransform,
    RandomZoom,
    from_batch,
    hu_to_window,
    to_batch,
    window_to_hu,
)

_NAMES_FILE = Path(__file__).resolve().parents[1] / "resources" / "sample" / "totalsegmentator_v2_label_names.json"
NUM_IDS = 256  # structure ids are 0..255 (lookup tables of this size)
PHASES = ("native", "arterial", "portal_venous", "delayed")
# "delayed" (equilibrium, 3-5 min) weighs 0 by default, so v0.4.1's stages draw as they did; a stage
# asks for it with `generalise.phase_probs`.
DEFAULT_PHASE_PROBS = {"native": 0.3, "arterial": 0.35, "portal_venous": 0.35, "delayed": 0.0}

# ids for model classes that TotalSegmentator v2 lacks, and for unlabelled tissue found by thresholds
LUNG_ID, BONE_ID, BODY_ID, FAT_ID, GAS_ID = 249, 250, 251, 252, 253
EXTRA_STRUCTURES: dict[int, str] = {
    230: "celiac_trunk", 231: "superior_mesenteric_artery", 232: "pulmonary_artery", 233: "hepatic_vessel",
    234: "rectum", 235: "intestine", 236: "lung_left", 237: "lung_right", 238: "prostate_or_uterus",
    239: "femur_head_left", 240: "femur_head_right", 241: "kidney_tumor", 242: "liver_tumor", 243: "pancreas_tumor",
    244: "hepatic_vessel_tumor", 245: "lung_tumor", 246: "colon_tumor", 247: "kidney_cyst",
    LUNG_ID: "lung_unlabelled", BONE_ID: "bone_unlabelled", BODY_ID: "body", FAT_ID: "fat", GAS_ID: "gas",
    TABLE_ID: "table",
}


# ----------------------------------------------------------------------------------------------- tissues


@dataclass(frozen=True)
class TissueHU:
    """CT appearance of one tissue: ranges (HU) the random draws come from.

    `native`, `arterial`, `portal_venous`, `delayed`: range of the mean in each contrast phase. `std`: voxel
    noise inside the structure. `texture`: amplitude of the smooth per-structure texture. `rim`: extra
    intensity of the structure's outer shell per phase (renal cortex, cortical bone, table surface).
    `enhances`: `ContrastPhaseAugment` re-targets it on real images.
    """

    native: tuple[float, float]
    arterial: tuple[float, float]
    portal_venous: tuple[float, float]
    delayed: tuple[float, float]
    std: tuple[float, float] = (3.0, 15.0)
    texture: tuple[float, float] = (0.0, 20.0)
    rim: tuple[tuple[float, float], ...] = ((-10.0, 10.0),) * len(PHASES)
    enhances: bool = False

    def mean_range(self, phase: str) -> tuple[float, float]:
        return getattr(self, phase)


def _same(lo: float, hi: float) -> tuple[tuple[float, float], ...]:
    return ((lo, hi),) * len(PHASES)


# Phase ranges: literature-typical adult values. Portal-venous (60-70 s): the portal vein 110-220 HU and
# the veins 80-200 (the infrarenal IVC enhances less than the suprarenal; 150-200 until v0.4.1).
# Delayed (equilibrium, 3-5 min): blood pool 100-170 HU, liver and spleen homogeneous, the kidneys'
# nephrogram homogeneous (no cortex rim).
TISSUES: dict[str, TissueHU] = {
    "outside": TissueHU(*_same(-1024, -960), std=(0, 10), texture=(0, 5), rim=_same(0, 0)),
    "gas": TissueHU(*_same(-1010, -850), std=(5, 40), texture=(0, 60), rim=_same(0, 0)),
    "airway": TissueHU(*_same(-1010, -900), std=(5, 20), texture=(0, 20), rim=_same(0, 0)),
    "lung": TissueHU(*_same(-900, -700), std=(20, 60), texture=(20, 120), rim=_same(0, 0)),
    "fat": TissueHU(*_same(-120, -60), std=(5, 20), texture=(0, 20)),
    "body": TissueHU((0, 60), (10, 70), (20, 80), (20, 80), std=(5, 20), texture=(5, 40)),
    "muscle": TissueHU((35, 65), (40, 70), (45, 75), (45, 75), texture=(0, 15)),
    "liver": TissueHU((40, 70), (55, 95), (90, 150), (70, 110), texture=(0, 15), enhances=True),
    "spleen": TissueHU((35, 60), (80, 170), (90, 150), (80, 120), texture=(0, 25), enhances=True),
    "kidney": TissueHU((20, 45), (60, 130), (120, 220), (100, 200), texture=(0, 15),
                       rim=((0, 10), (80, 200), (0, 40), (0, 20)), enhances=True),
    "organ": TissueHU((25, 60), (70, 140), (60, 120), (60, 100), texture=(0, 15), enhances=True),
    "thyroid": TissueHU((70, 120), (120, 250), (100, 180), (90, 150), texture=(0, 15), enhances=True),
    "hollow": TissueHU((-10, 45), (20, 80), (30, 90), (30, 90), std=(5, 25), texture=(10, 60)),
    "fluid": TissueHU(*_same(-5, 25), texture=(0, 8)),
    "artery": TissueHU((30, 60), (250, 500), (130, 220), (100, 170), texture=(0, 10), enhances=True),
    "pulmonary_artery": TissueHU((30, 60), (200, 600), (120, 200), (100, 160), texture=(0, 10), enhances=True),
    "heart": TissueHU((30, 60), (150, 450), (100, 180), (100, 160), texture=(0, 20), enhances=True),
    "portal": TissueHU((30, 60), (80, 160), (110, 220), (100, 160), texture=(0, 10), enhances=True),
    "vein": TissueHU((30, 60), (60, 160), (80, 200), (100, 160), texture=(0, 10), enhances=True),
    "bone": TissueHU(*_same(150, 450), std=(20, 60), texture=(30, 150), rim=_same(200, 800)),
    "cartilage": TissueHU(*_same(60, 200), texture=(0, 30)),
    "cns": TissueHU(*_same(20, 45), texture=(0, 10)),
    "lesion": TissueHU((10, 60), (30, 120), (40, 110), (40, 100), texture=(0, 30)),
    "table": TissueHU(*_same(-250, 300), std=(5, 30), texture=(0, 30), rim=_same(150, 700)),
}
TISSUE_NAMES = tuple(TISSUES)
ARTERY_NATIVE_HU = 40.0  # unenhanced blood: `split_lumens` never lowers a lumen below it
SPLIT_LUMEN_BLOB_MM = (10.0, 30.0)  # size range of the parts `split_lumens` cuts an artery into

# first match wins: (pattern on the structure name, tissue)
_TISSUE_RULES: tuple[tuple[str, str], ...] = (
    (r"tumou?r|lesion", "lesion"), (r"cyst|bladder", "fluid"), (r"^table$", "table"), (r"^body$", "body"),
    (r"^fat$", "fat"), (r"^gas$", "gas"), (r"trachea", "airway"), (r"lung", "lung"),
    (r"vertebrae|sacrum|^rib_|^hip_|femur|humerus|scapula|clavicula|skull|sternum|bone", "bone"),
    (r"cartilage", "cartilage"), (r"gluteus|autochthon|iliopsoas|muscle", "muscle"), (r"spinal_cord|brain", "cns"),
    (r"liver", "liver"), (r"spleen", "spleen"), (r"kidney", "kidney"), (r"thyroid", "thyroid"),
    (r"pancreas|adrenal|prostate|uterus", "organ"),
    (r"stomach|bowel|duodenum|colon|esophagus|intestine|rectum", "hollow"),
    (r"pulmonary_artery", "pulmonary_artery"), (r"heart|atrial_appendage|pulmonary_vein", "heart"),
    (r"portal_vein|hepatic_vessel", "portal"), (r"aorta|arter|brachiocephalic_trunk|celiac_trunk", "artery"),
    (r"vena|vein", "vein"),
)
_HOLLOW_GAS = re.compile(r"stomach|bowel|duodenum|colon|esophagus|intestine|rectum")


def tissue_of(name: str) -> str:
    """The tissue (key of `TISSUES`) of a structure or class name; unknown names count as body."""
    for pattern, tissue in _TISSUE_RULES:
        if re.search(pattern, name):
            return tissue
    return "body"


@lru_cache(maxsize=1)
def structure_names() -> dict[int, str]:
    """Structure id -> name: TotalSegmentator v2 ids (bundled names file) plus `EXTRA_STRUCTURES`."""
    names = {int(k): v for k, v in json.loads(_NAMES_FILE.read_text()).items()}
    return {0: "outside", **names, **EXTRA_STRUCTURES}


def structure_id(name: str) -> int | None:
    """The structure id of a TotalSegmentator or model class name (None when unknown)."""
    lookup = {v: k for k, v in structure_names().items()}
    return lookup.get(name)


@lru_cache(maxsize=1)
def _id_tissue() -> torch.Tensor:
    """(NUM_IDS,) tissue index per structure id (unknown ids: body)."""
    names = structure_names()
    table = torch.full((NUM_IDS,), TISSUE_NAMES.index("body"), dtype=torch.long)
    for i, name in names.items():
        if i < NUM_IDS:
            table[i] = TISSUE_NAMES.index("outside" if i == 0 else tissue_of(name))
    return table


@cache
def _ranges(field: str) -> torch.Tensor:
    """(T, P, 2) lo/hi per tissue and phase of `field` ("mean", "rim") or (T, 2) for std / texture."""
    if field == "mean":
        return torch.tensor([[t.mean_range(p) for p in PHASES] for t in TISSUES.values()])
    if field == "rim":
        return torch.tensor([list(t.rim) for t in TISSUES.values()])
    return torch.tensor([getattr(t, field) for t in TISSUES.values()])


# ----------------------------------------------------------------------------------------------- structure maps


def build_structure_map(hu: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None, *,
                        spacing_mm: float | Sequence[float] = 1.5, body_hu: float = -500.0, gas_hu: float = -400.0,
                        fat_hu: tuple[float, float] = (-190.0, -30.0), bone_hu: float = 200.0,
                        lung_min_ml: float = 100.0, object_min_ml: float = 2.0, axes: Axes = RAS_AXES) -> np.ndarray:
    """A full anatomical label map (int16, same grid) from a real CT in HU and its label map.

    Labelled voxels keep their ids (TotalSegmentator v2 ids, or `EXTRA_STRUCTURES` via
    `label_map_from_masks`). The body is the largest connected component of HU > `body_hu`, holes
    filled slice by slice; other dense objects outside it (table, clothes, cables) become `TABLE_ID`.
    Unlabelled body voxels become lung (air components >= `lung_min_ml`), gas (smaller air pockets,
    and the gas inside labelled bowel, stomach or oesophagus), fat (`fat_hu`), bone (>= `bone_hu`)
    or body (the rest). Needs unclipped HU: with an image already clipped to the model window pass
    `body_hu=gas_hu=-170`.
    """
    from scipy import ndimage

    from UniversalSegLib.components import connected_components

    hu = np.asarray(hu.cpu() if isinstance(hu, torch.Tensor) else hu, dtype=np.float32)
    lab = np.zeros(hu.shape, np.int16) if labels is None else np.asarray(
        labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int16)
    if lab.shape != hu.shape:
        raise ValueError(f"labels {lab.shape} and image {hu.shape} differ in shape")
    voxel_ml = float(np.prod(np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)))) / 1000.0
    dense = (hu > body_hu) | (lab > 0)
    components = connected_components(dense, connectivity=6)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    if sizes.max() == 0:
        return lab
    body = components == int(sizes.argmax())
    body = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(body, axes.si, 0)], axis=axes.si)
    out = lab.copy()
    objects = dense & ~body
    keep = np.flatnonzero(sizes * voxel_ml >= object_min_ml)
    out[objects & np.isin(components, keep) & (lab == 0)] = TABLE_ID
    free = body & (lab == 0)
    air = free & (hu < gas_hu)
    air_parts = connected_components(air, connectivity=26)
    air_sizes = np.bincount(air_parts.ravel()) * voxel_ml
    air_sizes[0] = 0
    lungs = np.isin(air_parts, np.flatnonzero(air_sizes >= lung_min_ml)) & air
    out[air & ~lungs] = GAS_ID
    out[lungs] = LUNG_ID
    out[free & ~air & (hu >= fat_hu[0]) & (hu < fat_hu[1])] = FAT_ID
    out[free & (hu >= bone_hu)] = BONE_ID
    out[free & (out == 0)] = BODY_ID
    hollow = [i for i, n in structure_names().items() if _HOLLOW_GAS.search(n)]
    out[np.isin(lab, hollow) & (hu < gas_hu)] = GAS_ID
    return out


def label_map_from_masks(masks: Mapping[str, np.ndarray | torch.Tensor], skip_unknown: bool = True) -> np.ndarray:
    """An int16 structure map from binary masks named by TotalSegmentator or model class names.

    Later masks overwrite earlier ones where they overlap. Names without a structure id (e.g.
    "aorta_true_lumen") are skipped, or raise ValueError with `skip_unknown=False`.
    """
    out: np.ndarray | None = None
    for name, mask in masks.items():
        mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask) > 0
        out = np.zeros(mask.shape, np.int16) if out is None else out
        sid = structure_id(name)
        if sid is None:
            if not skip_unknown:
                raise ValueError(f"no structure id for mask {name!r}")
            continue
        out[mask] = sid
    if out is None:
        raise ValueError("no masks given")
    return out


def label_map_from_channels(label: torch.Tensor, class_keys: Sequence[str],
                            annotated: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D, H, W) long structure ids from a multi-hot label (B, K, D, H, W) whose channels are `class_keys`.

    Only annotated channels with a known structure id count; later channels win where they overlap.
    """
    if label.shape[1] != len(class_keys):
        raise ValueError(f"label has {label.shape[1]} channels but {len(class_keys)} class keys were given")
    ids = torch.zeros((label.shape[0], *label.shape[2:]), dtype=torch.long, device=label.device)
    for k, key in enumerate(class_keys):
        sid = structure_id(key)
        if sid is None:
            continue
        on = label[:, k] > 0.5
        if annotated is not None:
            on &= annotated[:, k].to(on.device).bool().view(-1, 1, 1, 1)
        ids[on] = sid
    return ids


LABEL_KEYS = "label_keys"  # optional sample entry: the names of the label channels (list of str)


def sample_structure_ids(batch: dict[str, Any], class_keys: Sequence[str] | None = None) -> torch.Tensor | None:
    """(B, D, H, W) long structure ids of a batched sample: its `structure_map`, else its label channels
    named by the sample's `label_keys` or by `class_keys`; None when neither is available."""
    if batch.get(STRUCTURES) is not None:
        return _clean_ids(batch[STRUCTURES])
    keys = batch.get(LABEL_KEYS) or class_keys
    if keys is None or batch.get(LABEL) is None:
        return None
    return label_map_from_channels(batch[LABEL], list(keys), batch.get(ANNOTATED))


def complete_structure_map(ids: torch.Tensor, image: torch.Tensor, air_level: float = 0.01) -> torch.Tensor:
    """Give unlabelled (0) voxels that are not air in `image` (B, 1, D, H, W) a fat/body/bone id by their HU."""
    hu = window_to_hu(image[:, 0])
    fill = torch.full_like(ids, BODY_ID)
    fill = torch.where(hu < -30, torch.full_like(ids, FAT_ID), fill)
    fill = torch.where(hu >= 200, torch.full_like(ids, BONE_ID), fill)
    return torch.where((ids == 0) & (image[:, 0] > air_level), fill, ids)


def _clean_ids(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.long()
    return torch.where((ids < 0) | (ids >= NUM_IDS), torch.full_like(ids, BODY_ID), ids)


def rim_mask(ids: torch.Tensor, width: int) -> torch.Tensor:
    """(B, D, H, W) bool: voxels with a different structure id within `width` voxels along an axis."""
    rim = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for dim in (1, 2, 3):
        n = ids.shape[dim]
        for step in range(1, min(width, n - 1) + 1):
            differs = ids.narrow(dim, step, n - step) != ids.narrow(dim, 0, n - step)
            rim.narrow(dim, step, n - step).logical_or_(differs)
            rim.narrow(dim, 0, n - step).logical_or_(differs)
    return rim


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-sample table lookup: table (B, NUM_IDS), ids (B, D, H, W) -> (B, 1, D, H, W)."""
    flat = torch.gather(table.to(ids.device), 1, ids.flatten(1))
    return flat.view(ids.shape).unsqueeze(1)


# ----------------------------------------------------------------------------------------------- filters


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur (B, C, D, H, W) with a per-sample Gaussian; `sigma` (B, 3) in voxels (<= 0.05: that axis untouched).

    Separable, borders replicated; axes without blur cost nothing.
    """
    out = []
    for b in range(x.shape[0]):
        y = x[b:b + 1]
        channels = y.shape[1]
        for dim, s in enumerate(sigma[b].cpu()):
            if s <= 0.05 or y.shape[2 + dim] < 2:
                continue
            kernel = gaussian_1d(s, truncated=3.0, normalize=True).to(y)
            half = kernel.numel() // 2
            shape = [1, 1, 1]
            shape[dim] = kernel.numel()
            pad = [0] * 6
            pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = half  # F.pad lists the last dim first
            y = F.conv3d(F.pad(y, pad, mode="replicate"), kernel.view(1, 1, *shape).repeat(channels, 1, 1, 1, 1),
                         groups=channels)
        out.append(y)
    return torch.cat(out)


def simulate_slice_thickness(x: torch.Tensor, factor: float, dim: int) -> torch.Tensor:
    """Thick-slice acquisition along spatial `dim` of (1, C, D, H, W): slice profile blur (FWHM = `factor`
    voxels), sampling every `factor` voxels, linear interpolation back to the grid."""
    if factor <= 1.05:
        return x
    sigma = torch.zeros(1, 3)
    sigma[0, dim] = factor / 2.355
    blurred = gaussian_blur(x, sigma)
    size = list(x.shape[2:])
    small = list(size)
    small[dim] = max(2, round(size[dim] / factor))
    low = F.interpolate(blurred, size=small, mode="trilinear", align_corners=True)
    return F.interpolate(low, size=size, mode="trilinear", align_corners=True)


def _unit_std(x: torch.Tensor) -> torch.Tensor:
    return x / x.flatten(1).std(dim=1).clamp(min=1e-6).view(-1, *([1] * (x.ndim - 1)))


UNENHANCED_HU = ARTERY_NATIVE_HU  # blood and parenchyma without contrast
ENHANCED_MARGIN_HU = 60.0  # a structure this far above UNENHANCED_HU holds contrast its voxels' HU can measure
MAX_CONTRAST_SHARE = 2.5  # a voxel at most this many times its structure's mean enhancement (calcium, jets)
_NOT_A_VESSEL_EDGE = ("outside", "bone", "cartilage", "table")  # bright or air: never a lumen's partial volume


def enhancement_field(hu: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, current: torch.Tensor,
                      target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """HU change that moves each enhancing structure from its `current` mean to `target`.

    Contrast is iodine in blood: a voxel changes by the share of it that is enhancing blood or
    parenchyma. In a structure enhanced now (mean over 100 HU), that share is read from the voxel's
    HU (smoothed deep inside) between unenhanced tissue (40 HU) and the structure's mean: a lumen's partial-volume
    border, inside the label or just outside it, and the unevenness of the contrast scale with the
    enhancement, while the fine noise stays. An arterial lumen of 470 HU so becomes a portal-venous
    one of 180 HU without a bright ring left around it. In an unenhanced structure the HU tells
    nothing of the share, so it is geometric: the label blurred by `sigma`.

    Args:
        hu: (B, 1, D, H, W) image in HU, not clipped above the model's window.
        ids: (B, D, H, W) structure ids.
        valid: (B, NUM_IDS) bool: the structures to change.
        current: (B, NUM_IDS) each structure's mean HU now.
        target: (B, NUM_IDS) the mean HU wanted.
        sigma: (B, 3) feathering of the label edges, in voxels.

    Returns:
        (B, 1, D, H, W) HU offsets (zero farther than ~3 sigma from every changed structure).
    """
    inside = _lookup(valid.float(), ids)
    weight = gaussian_blur(inside, sigma)  # geometric share, reaching just outside the labels

    def spread(table: torch.Tensor) -> torch.Tensor:
        """A structure's value inside it; just outside, the weighted mean of its neighbours' values."""
        values = _lookup(table, ids) * inside
        return torch.where(inside > 0, values, gaussian_blur(values, sigma) / weight.clamp(min=1e-3))

    delta = spread(torch.where(valid, target - current, torch.zeros_like(target)))
    mean = spread(torch.where(valid, current, torch.full_like(current, UNENHANCED_HU)))
    enhancement = mean - UNENHANCED_HU
    # deep inside, the smoothed HU (the noise stays as it is); at and beyond the label's edge the voxel's own
    # (smoothing would lend a ring voxel its lumen neighbours' contrast)
    measured = torch.where(weight > 0.95, gaussian_blur(hu, sigma), hu)
    share = ((measured - UNENHANCED_HU) / enhancement.clamp(min=1.0)).clamp(0, MAX_CONTRAST_SHARE)
    share = torch.where(inside > 0, share, share.clamp(max=1.0))  # a neighbour brighter than the lumen is not it
    share = torch.where(enhancement > ENHANCED_MARGIN_HU, share, weight)
    no_edge = torch.tensor([t in _NOT_A_VESSEL_EDGE for t in TISSUE_NAMES])[_id_tissue()].float()
    outside_ok = (inside > 0) | (_lookup(no_edge[None].expand(ids.shape[0], -1), ids) == 0)
    return torch.where((weight > 0.02) & outside_ok, share * delta, torch.zeros_like(delta))


# ----------------------------------------------------------------------------------------------- shared intensity steps


class _IntensityBase(RandomTransform):
    """Random draws and image-wide steps shared by synthesis and real-image augmentation."""

    def __init__(self, p: float, phase_probs: Mapping[str, float] | None, spacing_mm: float | Sequence[float],
                 axes: Axes, seed: int | None):
        super().__init__(p, seed)
        probs = dict(DEFAULT_PHASE_PROBS if phase_probs is None else phase_probs)
        unknown = set(probs) - set(PHASES)
        if unknown or sum(probs.values()) <= 0:
            raise ValueError(f"phase_probs must weigh some of {PHASES}, got {probs}")
        self.phase_probs = probs
        self.spacing_mm = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)))
        self.axes = axes

    def draw_phases(self, n: int) -> torch.Tensor:
        """(n,) phase indices. One uniform number per sample (inverse CDF), so adding a phase to
        `PHASES` never shifts the other transforms' random streams (`torch.multinomial`'s
        consumption depends on the number of categories)."""
        weights = torch.tensor([self.phase_probs.get(p, 0.0) for p in PHASES], dtype=torch.float64)
        cdf = torch.cumsum(weights / weights.sum(), 0)
        u = torch.rand(n, generator=self.generator, dtype=torch.float64)
        return torch.searchsorted(cdf, u, right=True).clamp(max=len(PHASES) - 1)

    def draw_means(self, phases: torch.Tensor, jitter: float) -> torch.Tensor:
        """(B, NUM_IDS) mean HU: one draw per tissue and sample, plus a per-structure jitter."""
        ranges = _ranges("mean")[:, phases].permute(1, 0, 2)  # (B, T, 2)
        lo, hi = ranges[..., 0], ranges[..., 1]
        tissue_mean = lo + (hi - lo) * torch.rand(lo.shape, generator=self.generator)
        tissue = _id_tissue()
        spread = (hi - lo)[:, tissue]
        return tissue_mean[:, tissue] + jitter * spread * (2 * torch.rand(spread.shape, generator=self.generator) - 1)

    def draw_rims(self, phases: torch.Tensor) -> torch.Tensor:
        """(B, NUM_IDS) extra HU of each structure's outer shell for the sampled phases."""
        ranges = _ranges("rim")[_id_tissue()][:, phases].permute(1, 0, 2)  # (B, NUM_IDS, 2)
        u = torch.rand(ranges.shape[:2], generator=self.generator)
        return ranges[..., 0] + (ranges[..., 1] - ranges[..., 0]) * u

    def rim_width(self, rim_mm: float) -> int:
        return max(1, round(rim_mm / min(self.spacing_mm)))

    def blur(self, x: torch.Tensor, sigma_mm: tuple[float, float]) -> torch.Tensor:
        sigma = self.uniform(*sigma_mm, x.shape[0])[:, None] / torch.tensor(self.spacing_mm)[None, :]
        return gaussian_blur(x, sigma)

    def thick_slices(self, x: torch.Tensor, thickness_mm: tuple[float, float]) -> torch.Tensor:
        dim = self.axes.si
        out = [simulate_slice_thickness(x[b:b + 1], float(self.uniform(*thickness_mm)) / self.spacing_mm[dim], dim)
               for b in range(x.shape[0])]
        return torch.cat(out)

    def correlated_noise(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """Unit-std noise with a random short correlation (CT noise texture depends on the kernel)."""
        noise = self.randn(shape, device)
        sigma = self.uniform(0.0, 0.8, shape[0])[:, None].repeat(1, 3)
        return _unit_std(gaussian_blur(noise, sigma))

    def gamma(self, x: torch.Tensor, gamma: tuple[float, float]) -> torch.Tensor:
        g = self.log_uniform(*gamma, x.shape[0]).to(x).view(-1, 1, 1, 1, 1)
        return x.clamp(0, 1) ** g

    def split_lumens(self, ids: torch.Tensor, means: torch.Tensor, p: float,
                     drop: tuple[float, float]) -> torch.Tensor | None:
        """(B, 1, D, H, W) HU offset that takes a fraction (`drop`) of the enhancement out of one side
        of a smooth random surface through every artery, in the samples drawn with probability `p`;
        None when none is. An aortic dissection's false lumen (scan B: median 230 HU beside a true
        lumen of 471), mixing of contrast and thrombus all show a vessel enhanced in part only.
        `means`: (B, NUM_IDS) each structure's mean HU after its phase was drawn.
        """
        if p <= 0:  # no draws at all: other transforms' random streams stay as they were
            return None
        picked = self.chance(p, ids.shape[0])
        if not picked.any():
            return None
        # blobs of 10-30 mm: the surface crosses an aorta's lumen (~25 mm), not only runs along it
        blob_mm = float(self.uniform(*SPLIT_LUMEN_BLOB_MM))
        cells = [max(2, round(n * mm / blob_mm)) for n, mm in zip(ids.shape[1:], self.spacing_mm)]
        coarse = self.randn((ids.shape[0], 1, *cells), ids.device)
        side = F.interpolate(coarse, size=tuple(ids.shape[1:]), mode="trilinear", align_corners=True) > 0
        fraction = self.uniform(*drop, ids.shape[0]) * picked  # (B,) on the CPU, like `_id_tissue`
        artery = _id_tissue() == TISSUE_NAMES.index("artery")
        enhancement = (means.cpu() - ARTERY_NATIVE_HU).clamp(min=0) * artery * fraction[:, None]
        return -_lookup(enhancement, ids) * side

    def maybe(self, p: float, fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> torch.Tensor:
        """Apply `fn(x[sel], *args)` to the samples selected with probability p."""
        sel = torch.nonzero(self.chance(p, x.shape[0])).flatten()
        if sel.numel() == 0:
            return x
        out = x.clone()
        sel = sel.to(x.device)
        out[sel] = fn(x[sel], *args)
        return out


# ----------------------------------------------------------------------------------------------- synthesis


class SynthesizeFromLabels(_IntensityBase):
    """Replace the image by a CT synthesised from `structure_map` (SynthSeg-style domain randomisation).

    Per sample: a contrast phase; per tissue a mean HU from its range in that phase (`TISSUES`), per
    structure a jitter of that mean, a voxel noise std, a fine and a coarse texture amplitude, and a
    shell offset (renal cortex in the arterial phase, cortical bone); with `p_random_contrast` every
    structure instead gets a uniform mean from `random_hu` (full SynthSeg randomisation, shape over
    intensity). Then image-wide: bias field, slice thickness, blur, correlated noise, HU window, gamma.
    Labels are untouched, so they stay aligned. Without a `structure_map` the structures come from the
    label channels named by the sample's `label_keys` or `class_keys` (fewer structures; the rest of
    the body is completed from the image). Samples with neither, and those not drawn (probability
    1 - p), go to `real_transform` (e.g. `ContrastPhaseAugment`) when given.

    Parameters:
        p: probability of synthesising a sample (`p_synth`).
        phase_probs: weights of "native", "arterial", "portal_venous", "delayed".
        p_random_contrast, random_hu: full randomisation probability and its HU range.
        structure_jitter: per-structure deviation from its tissue draw, as a fraction of the range.
        texture_scale: multiplies the texture amplitudes (0: flat structures).
        rim_mm: thickness of the structure shells that get the rim offset.
        p_bias, bias_std: probability and strength (log std) of the smooth multiplicative bias on
            (HU + 1000), i.e. on attenuation, so air stays air.
        p_thick, slice_thickness_mm: probability and range of simulated slice thickness (along SI).
        p_blur, blur_sigma_mm: probability and sigma range of an isotropic blur (partial volume and
            reconstruction kernel; on by default, as label maps have hard edges).
        noise_hu: range of the global noise std in HU (always applied; 0 at the low end).
        p_gamma, gamma: probability and range of a gamma on the [0, 1] window.
        p_split_lumen, split_lumen_drop: probability that the arteries are enhanced in part only,
            and the range of the fraction of enhancement the other part loses (`split_lumens`).
        spacing_mm: voxel spacing of the samples.
        complete_from_image: give unlabelled non-air voxels of the real image a fat/body/bone id first.
        class_keys: names of the label channels, used when a sample has no structure map.
        real_transform: applied to the samples that are not synthesised.
    """

    def __init__(self, p: float = 0.5, phase_probs: Mapping[str, float] | None = None,
                 p_random_contrast: float = 0.15, random_hu: tuple[float, float] = (-200.0, 350.0),
                 structure_jitter: float = 0.25, texture_scale: float = 1.0, rim_mm: float = 3.0,
                 p_bias: float = 0.5, bias_std: float = 0.04, p_thick: float = 0.4,
                 slice_thickness_mm: tuple[float, float] = (1.5, 7.0), p_blur: float = 1.0,
                 blur_sigma_mm: tuple[float, float] = (0.5, 1.8), noise_hu: tuple[float, float] = (0.0, 40.0),
                 p_gamma: float = 0.3, gamma: tuple[float, float] = (0.7, 1.5), p_split_lumen: float = 0.0,
                 split_lumen_drop: tuple[float, float] = (0.3, 0.9),
                 spacing_mm: float | Sequence[float] = 1.5, complete_from_image: bool = True,
                 class_keys: Sequence[str] | None = None, real_transform: RandomTransform | None = None,
                 axes: Axes = RAS_AXES, seed: int | None = None):
        super().__init__(p, phase_probs, spacing_mm, axes, seed)
        self.class_keys = None if class_keys is None else list(class_keys)
        self.p_random_contrast, self.random_hu = p_random_contrast, random_hu
        self.structure_jitter, self.texture_scale, self.rim_mm = structure_jitter, texture_scale, rim_mm
        self.p_bias, self.bias_std = p_bias, bias_std
        self.p_thick, self.slice_thickness_mm = p_thick, slice_thickness_mm
        self.p_blur, self.blur_sigma_mm, self.noise_hu = p_blur, blur_sigma_mm, noise_hu
        self.p_gamma, self.gamma_range = p_gamma, gamma
        self.p_split_lumen, self.split_lumen_drop = p_split_lumen, split_lumen_drop
        self.complete_from_image, self.real_transform = complete_from_image, real_transform
        self.last_params: list[dict[str, Any]] = []

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = batch[IMAGE].shape[0]
        fire = self.chance(self.p, n)
        ids = sample_structure_ids(batch, self.class_keys) if fire.any() else None
        fire &= ids is not None
        self.last_params = [{"synthesized": bool(f)} for f in fire]
        out = dict(batch)
        if fire.any():
            sel = torch.nonzero(fire).flatten().to(batch[IMAGE].device)
            image = out[IMAGE].clone()
            image[sel] = self.synthesize(ids[sel], batch[IMAGE][sel], fire).to(image.dtype)
            out[IMAGE] = image
        if self.real_transform is not None and not fire.all():
            rest = torch.nonzero(~fire).flatten()
            part = {k: (v[rest.to(v.device)] if _batched(k, v) else v) for k, v in out.items()}
            part = self.real_transform.apply(part)
            image = out[IMAGE].clone()
            image[rest.to(image.device)] = part[IMAGE]
            out[IMAGE] = image
        return out

    def synthesize(self, structure_map: torch.Tensor, image: torch.Tensor, fire: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) synthetic image in [0, 1] for structure maps (B, D, H, W)."""
        ids = _clean_ids(structure_map)  # also accepts raw int16 maps
        if self.complete_from_image:
            ids = complete_structure_map(ids, image.float())
        hu = self._paint(ids, [i for i, f in enumerate(fire) if f])
        device = hu.device
        if self.p_bias > 0:
            hu = self.maybe(self.p_bias, self._bias, hu)
        hu = self.maybe(self.p_thick, self.thick_slices, hu, self.slice_thickness_mm)
        hu = self.maybe(self.p_blur, self.blur, hu, self.blur_sigma_mm)
        noise_std = self.uniform(*self.noise_hu, hu.shape[0]).to(device).view(-1, 1, 1, 1, 1)
        hu = hu + noise_std * self.correlated_noise(hu.shape, device)
        x = hu_to_window(hu)
        return self.maybe(self.p_gamma, self.gamma, x, self.gamma_range).clamp(0, 1)

    def _paint(self, ids: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """Per-structure intensities, noise, textures and shells in HU, (B, 1, D, H, W)."""
        n, device, shape = ids.shape[0], ids.device, (ids.shape[0], 1, *ids.shape[1:])
        phases = self.draw_phases(n)
        means = self.draw_means(phases, self.structure_jitter)
        randomised = self.chance(self.p_random_contrast, n)
        if randomised.any():
            free = self.uniform(*self.random_hu, n, NUM_IDS)
            free[:, 0] = means[:, 0]  # outside the body stays air
            means = torch.where(randomised[:, None], free, means)
        tissue = _id_tissue()
        std_r, tex_r = _ranges("std")[tissue], _ranges("texture")[tissue]  # (NUM_IDS, 2)
        stds = std_r[:, 0] + (std_r[:, 1] - std_r[:, 0]) * torch.rand(n, NUM_IDS, generator=self.generator)
        fine, coarse = (self.texture_scale * (tex_r[:, 0] + (tex_r[:, 1] - tex_r[:, 0]) *
                                              torch.rand(n, NUM_IDS, generator=self.generator)) for _ in range(2))
        rims = self.draw_rims(phases)
        hu = _lookup(means, ids) + _lookup(stds, ids) * self.randn(shape, device)
        if self.texture_scale > 0:
            hu = hu + _lookup(fine, ids) * self._fine_texture(shape, device)
            hu = hu + _lookup(coarse, ids) * self._coarse_texture(shape, device)
        hu = hu + _lookup(rims, ids) * rim_mask(ids, self.rim_width(self.rim_mm)).unsqueeze(1)
        split = self.split_lumens(ids, means, self.p_split_lumen, self.split_lumen_drop)
        if split is not None:  # a lowered voxel stops at unenhanced blood (noise may start it below the mean)
            hu = torch.maximum(hu + split, torch.clamp(hu, max=ARTERY_NATIVE_HU))
        present = [torch.nonzero(torch.bincount(ids[b].flatten(), minlength=NUM_IDS)).flatten().tolist()
                   for b in range(n)]
        for b, slot in enumerate(slots):
            self.last_params[slot].update(phase=PHASES[int(phases[b])], random_contrast=bool(randomised[b]),
                                          mean_hu={i: float(means[b, i]) for i in present[b]},
                                          rim_hu={i: float(rims[b, i]) for i in present[b]})
        return hu

    def _fine_texture(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        sigma = self.uniform(0.5, 1.5, shape[0])[:, None].repeat(1, 3)
        return _unit_std(gaussian_blur(self.randn(shape, device), sigma))

    def _coarse_texture(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        step = self.randint(4, 10)
        small = [max(2, s // step) for s in shape[2:]]
        field = self.randn((shape[0], 1, *small), device)
        return _unit_std(F.interpolate(field, size=tuple(shape[2:]), mode="trilinear", align_corners=True))

    def _bias(self, hu: torch.Tensor) -> torch.Tensor:
        coarse = self.randn((hu.shape[0], 1, 4, 4, 4), hu.device) * self.bias_std
        field = torch.exp(F.interpolate(coarse, size=hu.shape[2:], mode="trilinear", align_corners=True))
        return (hu + 1000.0) * field - 1000.0


def _batched(key: str, value: Any) -> bool:
    return key in (IMAGE, LABEL, STRUCTURES, ANNOTATED) and isinstance(value, torch.Tensor)


# ----------------------------------------------------------------------------------------------- real images


class ContrastPhaseAugment(_IntensityBase):
    """Intensity augmentation of REAL images: contrast phase where structures are labelled, plus global changes.

    Label-guided phase change (probability `p_label_guided`): structures come from `structure_map`
    or, without one, from the annotated label channels named by `class_keys`. Each enhancing
    structure (liver, spleen, kidneys, pancreas, arteries, veins, heart...) is moved from its current
    mean HU to a mean drawn for a random phase (`TISSUES`); the renal cortex gets its phase's shell
    offset; partial-volume edges and the contrast's unevenness follow (`enhancement_field`); the noise
    inside the structure is kept. Then: monotonic random intensity remapping, scale/shift, slice
    thickness, blur, noise (not on clipped air) and gamma. The image may hold values above 1 (HU above
    the window, as the training cache keeps them), so a bright lumen is changed from its real HU; the
    output is clipped to [0, 1].

    Parameters:
        p: probability per sample (the steps below have their own probabilities).
        class_keys: names of the label channels (model class keys), for label-guided changes without
            a structure map.
        phase_probs: weights of "native", "arterial", "portal_venous", "delayed".
        p_label_guided, edge_sigma_mm, rim_mm: phase change probability, feathering, cortex thickness.
        p_remap, remap_points, remap_std: random monotonic curve on the window (control points, std).
        p_scale_shift, scale, shift: linear change of the window values.
        p_thick, slice_thickness_mm, p_blur, blur_sigma_mm: resolution changes.
        p_noise, noise_hu: additive correlated noise (std range in HU).
        p_gamma, gamma: gamma on the window.
        p_split_lumen, split_lumen_drop: arteries enhanced in part only, after a phase change
            (`split_lumens`).
    """

    def __init__(self, p: float = 0.8, class_keys: Sequence[str] | None = None,
                 phase_probs: Mapping[str, float] | None = None, p_label_guided: float = 0.7,
                 edge_sigma_mm: float = 1.0, rim_mm: float = 3.0, p_remap: float = 0.3, remap_points: int = 6,
                 remap_std: float = 0.04, p_scale_shift: float = 0.5, scale: tuple[float, float] = (0.9, 1.1),
                 shift: tuple[float, float] = (-0.05, 0.05), p_thick: float = 0.2,
                 slice_thickness_mm: tuple[float, float] = (1.5, 6.0), p_blur: float = 0.2,
                 blur_sigma_mm: tuple[float, float] = (0.3, 1.2), p_noise: float = 0.5,
                 noise_hu: tuple[float, float] = (0.0, 25.0), p_gamma: float = 0.3,
                 gamma: tuple[float, float] = (0.7, 1.5), p_split_lumen: float = 0.0,
                 split_lumen_drop: tuple[float, float] = (0.3, 0.9), spacing_mm: float | Sequence[float] = 1.5,
                 axes: Axes = RAS_AXES, seed: int | None = None):
        super().__init__(p, phase_probs, spacing_mm, axes, seed)
        self.class_keys = None if class_keys is None else list(class_keys)
        self.p_split_lumen, self.split_lumen_drop = p_split_lumen, split_lumen_drop
        self.p_label_guided, self.edge_sigma_mm, self.rim_mm = p_label_guided, edge_sigma_mm, rim_mm
        self.p_remap, self.remap_points, self.remap_std = p_remap, remap_points, remap_std
        self.p_scale_shift, self.scale, self.shift = p_scale_shift, scale, shift
        self.p_thick, self.slice_thickness_mm, self.p_blur, self.blur_sigma_mm = (p_thick, slice_thickness_mm,
                                                                                   p_blur, blur_sigma_mm)
        self.p_noise, self.noise_hu, self.p_gamma, self.gamma_range = p_noise, noise_hu, p_gamma, gamma
        self.last_phases: list[str | None] = []

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = batch[IMAGE].shape[0]
        fire = torch.nonzero(self.chance(self.p, n)).flatten()
        self.last_phases = [None] * n
        if fire.numel() == 0:
            return batch
        device = batch[IMAGE].device
        sel = fire.to(device)
        x = batch[IMAGE][sel].float()
        ids = sample_structure_ids(batch, self.class_keys) if self.p_label_guided > 0 else None
        if ids is not None:
            ids = ids[sel]
            guided = torch.nonzero(self.chance(self.p_label_guided, len(sel))).flatten()
            if guided.numel():
                g = guided.to(device)
                x[g] = self._change_phase(x[g], ids[g], [int(fire[i]) for i in guided])
        x = self.maybe(self.p_remap, self._remap, x)
        x = self.maybe(self.p_scale_shift, self._scale_shift, x)
        x = self.maybe(self.p_thick, self.thick_slices, x, self.slice_thickness_mm)
        x = self.maybe(self.p_blur, self.blur, x, self.blur_sigma_mm)
        x = self.maybe(self.p_noise, self._noise, x)
        x = self.maybe(self.p_gamma, self.gamma, x, self.gamma_range)
        out = dict(batch)
        image = batch[IMAGE].clone()
        image[sel] = x.clamp(0, 1).to(image.dtype)
        out[IMAGE] = image
        return out

    def _change_phase(self, x: torch.Tensor, ids: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """Move each enhancing structure's mean HU to a draw for a random phase (`enhancement_field`).
        Returns window values NOT clipped above: later steps (blur, thick slices) then see a bright lumen
        as it is, and `apply` clips once at the end."""
        n, device = x.shape[0], x.device
        phases = self.draw_phases(n)
        for b, slot in enumerate(slots):
            self.last_phases[slot] = PHASES[int(phases[b])]
        hu = window_to_hu(x)
        rim = rim_mask(ids, self.rim_width(self.rim_mm))
        # current means from the structure interiors (edges carry partial volume)
        flat_ids = torch.where(rim, torch.zeros_like(ids), ids).flatten(1)
        sums = torch.zeros(n, NUM_IDS, device=device).scatter_add_(1, flat_ids, hu.flatten(1))
        counts = torch.zeros(n, NUM_IDS, device=device).scatter_add_(1, flat_ids, torch.ones_like(hu.flatten(1)))
        enhances = torch.tensor([TISSUES[t].enhances for t in TISSUE_NAMES])[_id_tissue()].to(device)
        valid = (counts > 0) & enhances[None, :]
        valid[:, 0] = False
        current = sums / counts.clamp(min=1)
        target = self.draw_means(phases, 0.1).to(device)
        sigma = (torch.tensor(self.edge_sigma_mm) / torch.tensor(self.spacing_mm)).repeat(n, 1)
        field = enhancement_field(hu, ids, valid, current, target, sigma)
        extra = _lookup(torch.where(valid, self.draw_rims(phases).to(device), torch.zeros_like(target)), ids)
        extra = extra * rim.unsqueeze(1)
        if self.p_split_lumen > 0:
            now = torch.where(valid, target, current)  # each structure's mean after the change
            split = self.split_lumens(ids, now, self.p_split_lumen, self.split_lumen_drop)
            if split is not None:
                extra = extra + split
        return hu_to_window(hu + field + gaussian_blur(extra, sigma), clip=False)

    def _remap(self, x: torch.Tensor) -> torch.Tensor:
        """A random monotonic piecewise-linear curve on [0, 1] that keeps 0 at 0 (air stays air)."""
        m = self.remap_points
        knots = torch.linspace(0, 1, m).repeat(x.shape[0], 1)
        values = (knots + self.remap_std * torch.randn(knots.shape, generator=self.generator)).clamp(0, 1)
        values[:, 0] = 0.0
        values = torch.cummax(values, dim=1).values.to(x.device)
        pos = x.clamp(0, 1).flatten(1) * (m - 1)
        idx = pos.floor().long().clamp(max=m - 2)
        t = pos - idx
        y = torch.gather(values, 1, idx) * (1 - t) + torch.gather(values, 1, idx + 1) * t
        return y.view_as(x)

    def _scale_shift(self, x: torch.Tensor) -> torch.Tensor:
        a = self.uniform(*self.scale, x.shape[0]).to(x).view(-1, 1, 1, 1, 1)
        b = self.uniform(*self.shift, x.shape[0]).to(x).view(-1, 1, 1, 1, 1)
        inside = x > 0  # air stays air; HU above the window scale too (the cache keeps them)
        return torch.where(inside, x * a + b, x)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        std = (self.uniform(*self.noise_hu, x.shape[0]) / (250.0 + 175.0)).to(x).view(-1, 1, 1, 1, 1)
        inside = x > 0  # clipped air stays black
        return torch.where(inside, x + std * self.correlated_noise(x.shape, x.device), x)


class ClipToWindow(RandomTransform):
    """The last step of a pipeline: clip the image to the model's window [0, 1]. The training cache keeps
    HU above the window so that the steps before it see a bright lumen as it is (`ContrastPhaseAugment`,
    blur, slice thickness); the model sees what inference gives it. Draws no random numbers."""

    def __init__(self):
        super().__init__(1.0, None)

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {**batch, IMAGE: batch[IMAGE].clamp(0.0, 1.0)}


# ----------------------------------------------------------------------------------------------- the pipeline


class Compose:
    """Apply transforms in order; `set_seed` re-seeds them all (each from its own offset)."""

    def __init__(self, transforms: Sequence[RandomTransform]):
        self.transforms = list(transforms)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        batch, single = to_batch(data)
        for transform in self.transforms:
            batch = transform.apply(batch)
        return from_batch(batch, single)

    def set_seed(self, seed: int | None, per_worker: bool = True) -> Compose:
        for i, transform in enumerate(self.transforms):
            transform.set_seed(None if seed is None else seed + 7919 * i, per_worker)
            if isinstance(transform, SynthesizeFromLabels) and transform.real_transform is not None:
                transform.real_transform.set_seed(None if seed is None else seed + 7919 * i + 1, per_worker)
        return self

    def set_random_state(self, seed: int | None = None, state: Any = None) -> Compose:
        """MONAI-style re-seeding, as the patch loader does once per patch."""
        return self.set_seed(seed, per_worker=False)

    def __repr__(self) -> str:
        return "Compose(\n  " + ",\n  ".join(map(repr, self.transforms)) + "\n)"


def build_generalisation_pipeline(p_synth: float = 0.5, spacing_mm: float | Sequence[float] = 1.5,
                                  class_keys: Sequence[str] | None = None, keep_size: bool = True,
                                  p_deform: float = 0.8, p_zoom: float = 0.15, p_fov: float = 0.25,
                                  p_partial: float = 0.15, p_slab: float = 0.2, p_contrast: float = 0.8,
                                  p_split_lumen: float = 0.0, phase_probs: Mapping[str, float] | None = None,
                                  axes: Axes = RAS_AXES, seed: int | None = None) -> Compose:
    """The domain-randomisation pipeline for the default model, in this order:

    ========================  ===========  =================================================================
    transform                 probability  what
    ========================  ===========  =================================================================
    RandomDeformation         p_deform     rotation (15 deg axial, 5 deg tilt), scale 0.8-1.2, elastic
    RandomZoom                p_zoom       in-plane zoom 0.6-1.5 (large / small field of view)
    RandomFOVPad              p_fov        pad the plane to 350-500 mm with air, table behind the back
    RandomPartialOrgan        p_partial    cut an annotated structure at the sample border
    RandomSlab                p_slab       keep 10-40 axial slices, air elsewhere
    SynthesizeFromLabels      p_synth      synthetic CT from the structure map (needs `structure_map`)
    ContrastPhaseAugment      p_contrast   on the real (not synthesised) images: phase, remap, noise...
    ClipToWindow              1            the image to [0, 1] (the cache keeps HU above the window)
    ========================  ===========  =================================================================

    `p_split_lumen` (both synthesis and phase change): arteries enhanced on one side of a random
    surface only (`split_lumens`); 0, the default, draws nothing and leaves every stream as before.
    `phase_probs` (both): weights of the contrast phases (`PHASES`); default `DEFAULT_PHASE_PROBS`.

    `keep_size=True` keeps every sample's shape (use on fixed-size patches and batches);
    `keep_size=False` lets RandomFOVPad enlarge whole volumes before the loader crops patches.
    `class_keys` (the label channel names; or a per-sample `label_keys` entry) lets synthesis and the
    phase change work from the label channels when a sample has no `structure_map`.
    Works per sample or batched, on CPU or GPU; never flips left and right.
    """

    def child_seed(i: int) -> int | None:
        return None if seed is None else seed + 7919 * i

    contrast = ContrastPhaseAugment(p_contrast, class_keys=class_keys, phase_probs=phase_probs,
                                    p_split_lumen=p_split_lumen, spacing_mm=spacing_mm, axes=axes, seed=child_seed(7))
    return Compose([
        RandomDeformation(p_deform, spacing_mm=spacing_mm, axes=axes, seed=child_seed(0)),
        RandomZoom(p_zoom, axes=axes, seed=child_seed(1)),
        RandomFOVPad(p_fov, spacing_mm=spacing_mm, keep_size=keep_size, axes=axes, seed=child_seed(2)),
        RandomPartialOrgan(p_partial, seed=child_seed(3)),
        RandomSlab(p_slab, axes=axes, seed=child_seed(4)),
        SynthesizeFromLabels(p_synth, spacing_mm=spacing_mm, class_keys=class_keys, real_transform=contrast, axes=axes,
                             phase_probs=phase_probs, p_split_lumen=p_split_lumen, seed=child_seed(5)),
        ClipToWindow(),
    ])
