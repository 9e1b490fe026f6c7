"""`postprocess.disjoint` on fragmented masks (a model on input it does not know, or random weights):
the same masks as a straightforward per-component reference, and work bounded by the number of masks,
not of components, on a clinical-size grid (458 x 379 x 224, the sample CT at 0.8 x 0.8 x 1.5 mm)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from UniversalSegLib.components import connected_components
from UniversalSegLib.inference import postprocess
from UniversalSegLib.inference.masks import BoxMask

CLINICAL_GRID = (224, 379, 458)  # (z, y, x)


def _reference_without_swallowed(mask: np.ndarray, own: np.ndarray | float, other: np.ndarray,
                                 theirs: np.ndarray) -> np.ndarray:
    """The rule read literally, one component at a time over the whole grid (quadratic, small grids only).

    `own` is the class's full-grid uint8 probability or its mean; `theirs` the other class's."""
    labels, n = connected_components(mask, connectivity=26, return_N=True)
    out = mask.copy()
    for label in range(1, n + 1):
        component = labels == label
        here = component & other
        if np.count_nonzero(here) < postprocess.SWALLOWED_SHARE * np.count_nonzero(component):
            continue
        own_sum = int(own[here].sum()) if isinstance(own, np.ndarray) else own * 255 * np.count_nonzero(here)
        if int(theirs[here].sum()) > own_sum:
            out &= ~component
    return out


def _reference_disjoint(masks: dict[str, np.ndarray], probabilities: dict[str, np.ndarray], keys: list[str],
                        outside: dict[str, float]) -> dict[str, np.ndarray]:
    out = dict(masks)
    for a in keys:
        for b in keys:
            if a != b:
                out[a] = _reference_without_swallowed(out[a], probabilities[a], masks[b], probabilities[b])
    for a, mean in outside.items():
        for b in keys:
            out[a] = _reference_without_swallowed(out[a], mean, masks[b], probabilities[b])
    return out


def _fragmented(rng: np.random.Generator, shape, keys: list[str], density: float):
    """Masks of speckle and blobs that overlap one another (a shared smooth field plus each one's
    noise), each voxel with a random uint8 probability: components of every size, many of them lying
    mostly inside another mask, some more probable there and some less."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5)
    field /= field.std()
    masks, probabilities = {}, {}
    for key in keys:
        own = field + 1.2 * rng.standard_normal(shape, dtype=np.float32)
        mask = own > np.quantile(own, 1 - density)
        masks[key] = mask
        probabilities[key] = np.where(mask, rng.integers(128, 256, shape, dtype=np.uint8), 0).astype(np.uint8)
    return masks, probabilities


def _boxed(masks, probabilities):
    boxes = {k: BoxMask.from_array(m) for k, m in masks.items()}
    values = {k: probabilities[k][m] for k, m in masks.items()}
    return boxes, values


def test_disjoint_on_fragmented_masks_equals_the_per_component_reference():
    rng = np.random.default_rng(28)
    vessels, organs = ["aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein"], ["liver"]
    masks, probabilities = _fragmented(rng, (36, 40, 44), vessels + organs, density=0.08)
    assert connected_components(masks["aorta"], return_N=True)[1] > 500  # fragmented indeed
    masks["portal_vein_and_splenic_vein"][:, :, 30:] = False  # boxes that only partly overlap
    masks["liver"][:12] = False
    outside = {"liver": 0.75}
    expected = _reference_disjoint(masks, probabilities, vessels, outside)
    boxes, values = _boxed(masks, probabilities)
    out = postprocess.disjoint(boxes, {k: values[k] for k in vessels}, vessels, outside)
    for key in vessels + organs:
        assert np.array_equal(out[key].array(), expected[key]), key
    dropped = sum(int(masks[k].sum() - expected[k].sum()) for k in masks)
    kept = sum(int(expected[k].sum()) for k in masks)
    assert dropped > 0 and kept > dropped  # the rule had work to do both ways


def test_disjoint_on_a_fragmented_clinical_grid_labels_each_mask_once(monkeypatch):
    """Thousands of components on a clinical-size grid: one labelling per mask and a fixed number of
    box reads per pair of masks, however many components there are."""
    rng = np.random.default_rng(7)
    shape = CLINICAL_GRID
    keys = ["aorta", "inferior_vena_cava", "liver"]
    field = rng.random(shape, dtype=np.float32)
    masks = {k: field < d for k, d in zip(keys, (0.02, 0.03, 0.02))}
    masks["inferior_vena_cava"] |= rng.random(shape, dtype=np.float32) < 0.01
    del field
    boxes = {k: BoxMask.from_array(m) for k, m in masks.items()}
    values = {k: rng.integers(100, 256, boxes[k].count, dtype=np.uint8) for k in ("aorta", "inferior_vena_cava")}
    components = connected_components(masks["aorta"], return_N=True)[1]
    assert components > 10_000
    del masks
    calls = {"labelled": 0, "regions": 0}
    label, region = postprocess.connected_components, BoxMask.region

    def counting_label(*args, **kwargs):
        calls["labelled"] += 1
        return label(*args, **kwargs)

    def counting_region(self, *args, **kwargs):
        calls["regions"] += 1
        return region(self, *args, **kwargs)

    monkeypatch.setattr(postprocess, "connected_components", counting_label)
    monkeypatch.setattr(BoxMask, "region", counting_region)
    out = postprocess.disjoint(boxes, values, ["aorta", "inferior_vena_cava"], {"liver": 0.5})
    pairs = 2 + 2
    assert calls["labelled"] == 3
    assert calls["regions"] <= 3 * pairs
    for key, box in boxes.items():
        assert out[key].count <= box.count
    # the aorta's speckle lies mostly inside the denser vena cava's only by chance: most of it stays
    assert out["aorta"].count > 0.5 * boxes["aorta"].count


def test_disjoint_when_the_boxes_share_fewer_voxels_than_the_mask_has_components():
    """Many small components and another vessel's box touching only a corner: the overlap is counted on
    a box with fewer voxels than there are components (cc3d's statistics refuse that: the default model
    met it on a small DICOM series once its portal vein head fired)."""
    shape = (12, 12, 12)
    vessel = np.zeros(shape, dtype=bool)
    vessel[::3, ::3, ::3] = True  # 64 single-voxel components
    corner = np.zeros(shape, dtype=bool)
    corner[9, 9, 9] = True  # a one-voxel box, wholly shared (counted densely), on the last-labelled component
    probabilities = {"aorta": np.full(shape, 100, np.uint8), "inferior_vena_cava": np.full(shape, 200, np.uint8)}
    masks = {"aorta": vessel, "inferior_vena_cava": corner}
    boxes, values = _boxed(masks, probabilities)
    out = postprocess.disjoint(boxes, values, ["aorta", "inferior_vena_cava"])
    expected = _reference_disjoint(masks, probabilities, ["aorta", "inferior_vena_cava"], {})
    for key in masks:
        assert np.array_equal(out[key].array(), expected[key]), key
    assert not out["aorta"].array()[9, 9, 9] and out["aorta"].array().sum() == 63  # the swallowed one goes
