"""Inference pipeline: geometry restored exactly, compact stitching, post-processing rules, subsets, progress.

Geometry is checked end to end with a pointwise stand-in model (class logit = 20 x (scaled HU - t)):
whatever the orientation and spacing, its mask must equal `HU > threshold` on the input grid, so
any flip, permutation or offset in preprocessing, stitching or resampling back shows up as voxel
mismatches. Learned-weight behaviour (subsets, chunking) uses a tiny random SegResNet model.
"""

from __future__ import annotations

from pathlib import Path

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_DIR, shared
from scipy import ndimage
from support import write_dicom_series
from torch import nn

from UniversalSegLib.errors import UnknownClassError
from UniversalSegLib.inference import postprocess, sliding_window
from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.inference.predict import needed_classes, predict
from UniversalSegLib.inference.preprocess import preprocess
from UniversalSegLib.inference.restore import SlabRestorer, to_input_grid
from UniversalSegLib.inference.sliding_window import class_probabilities
from UniversalSegLib.model.heads import HEAD_PARAMS
from UniversalSegLib.registry import ClassInfo, default_registry
from UniversalSegLib.store import LoadedModel, Manifest, Preprocessing, create_model, load_model, save_model

REG = default_registry()
SAMPLE = SAMPLE_DIR / "ct_abdomen.nii.gz"
SAMPLE_LABELS = SAMPLE_DIR / "ct_abdomen_labels_totalsegmentator_v2.nii.gz"
LOW, HIGH = -175.0, 250.0
# Scaled thresholds whose HU value (LOW + t * 425) is never an integer, so integer CTs have no ties.
THRESHOLDS = {"liver": 0.5, "spleen": 0.9}  # HU 37.5 and 207.5
KIDNEY_RIGHT, KIDNEY_LEFT, LIVER, SPLEEN = 2, 3, 5, 1
HIP_LEFT, HIP_RIGHT = 77, 78  # TotalSegmentator v2 ids in the sample label map
AORTA, IVC, ILIAC_ARTERY_LEFT, ILIAC_VEIN_LEFT = 52, 63, 65, 67


class ThresholdModel(nn.Module):
    """Pointwise stand-in for UniversalModel: logit of class c = 20 x (scaled intensity - t_c)."""

    head_class_chunk = 8

    def __init__(self, thresholds: list[float]):
        super().__init__()
        self.register_buffer("t", torch.tensor(thresholds, dtype=torch.float32))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        voxel = torch.zeros(x.shape[0], 8, *x.shape[2:], dtype=x.dtype)
        voxel[:, 0] = x[:, 0]
        return torch.zeros(x.shape[0], 256), voxel

    def head_parameters(self, image_feature: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        params = torch.zeros(image_feature.shape[0], idx.numel(), HEAD_PARAMS)
        params[..., 0] = 1.0  # layer 1: h0 = x
        params[..., 64] = 1.0  # layer 2: h0 = h0
        params[..., 128] = 20.0  # layer 3 weight
        params[..., 152] = -20.0 * self.t[idx]  # layer 3 bias
        return params


def stub_model(spacing: float, thresholds: dict[str, float] = THRESHOLDS, patch: int = 48,
               overlap: float = 0.5) -> LoadedModel:
    # thresholds, not anatomy: no rule, and no place in the body (the plausibility check leaves them)
    classes = [ClassInfo.from_dict({**REG[k].to_dict(), "postprocess": None, "location": {"trunk": False}})
               for k in thresholds]
    manifest = Manifest(name="threshold-stub", backbone="none", backbone_config={}, classes=classes,
                        preprocessing=Preprocessing(spacing=[spacing] * 3, hu_window=[LOW, HIGH],
                                                    patch_size=[patch] * 3, overlap=overlap))
    return LoadedModel(ThresholdModel(list(thresholds.values())).eval(), manifest, Path("stub"))


def expected_mask(image: sitk.Image, t: float) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float32) > LOW + t * (HIGH - LOW)


def assert_same_grid(result, image: sitk.Image) -> None:
    assert result.reference.GetSize() == image.GetSize()
    for c in result.classes:
        assert c.mask.shape == sitk.GetArrayViewFromImage(image).shape
    assert result.reference.GetSpacing() == image.GetSpacing()
    assert result.reference.GetOrigin() == image.GetOrigin()
    assert result.reference.GetDirection() == image.GetDirection()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def sample_crop() -> sitk.Image:
    return sitk.ReadImage(str(SAMPLE))[20:100, 15:85, 40:100]  # RAS, 3 mm, origin moved by the crop


# --- geometry ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
def test_masks_land_exactly_on_input_grid_in_any_orientation(orientation):
    """Model grid = input spacing, so the stand-in's mask must equal `HU > threshold` voxel for voxel."""
    image = sitk.DICOMOrient(sample_crop(), orientation)
    result = predict(image, model=stub_model(3.0), device="cpu")
    assert_same_grid(result, image)
    for key, t in THRESHOLDS.items():
        expected = expected_mask(image, t)
        assert expected.sum() > 1000
        assert np.array_equal(result[key].mask, expected), key


def test_lps_thorax_ct_on_its_own_grid():
    image = sitk.ReadImage(str(shared("ct-thorax-aorta", "ct.nii.gz")))[30:90, 30:100, 60:120]  # LPS, 1.5 mm
    assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    result = predict(image, model=stub_model(1.5, patch=64), device="cpu")
    assert_same_grid(result, image)
    for key, t in THRESHOLDS.items():
        assert np.array_equal(result[key].mask, expected_mask(image, t)), key


def test_coarser_model_grid_still_aligns():
    """At 4.5 mm the masks are blurred by resampling, but sit best unshifted, and alike for RAS and LPS input."""
    ras = sample_crop()
    lps = sitk.DICOMOrient(ras, "LPS")
    model = stub_model(4.5, patch=32)
    from_ras, from_lps = predict(ras, model=model, device="cpu"), predict(lps, model=model, device="cpu")
    assert_same_grid(from_lps, lps)
    for key, t in THRESHOLDS.items():
        mask, expected = from_ras[key].mask, expected_mask(ras, t)
        shifted = [dice(mask, np.roll(expected, s, axis=a)) for a in range(3) for s in (-1, 1)]
        assert dice(mask, expected) > 0.6 and dice(mask, expected) > max(shifted) + 0.03, (key, shifted)
        back = sitk.GetImageFromArray(from_lps[key].mask.astype(np.uint8))
        back.CopyInformation(lps)
        assert np.count_nonzero(sitk.GetArrayFromImage(sitk.DICOMOrient(back, "RAS")) != mask) <= mask.size // 10000


def test_dicom_series_input(tmp_path):
    from UniversalSegLib import io

    write_dicom_series(sitk.DICOMOrient(sample_crop(), "LPS"), tmp_path / "series")
    result = predict(tmp_path / "series", model=stub_model(3.0), device="cpu")
    image = io.read_image(tmp_path / "series")
    assert_same_grid(result, image)
    for key, t in THRESHOLDS.items():
        assert np.array_equal(result[key].mask, expected_mask(image, t)), key


def test_restoring_a_box_equals_resampling_everything():
    """The bounding-box shortcut in `to_input_grid` gives exactly the full resampling's mask."""
    image = sitk.ReadImage(str(SAMPLE))
    labels = sitk.ReadImage(str(SAMPLE_LABELS))
    pre = Preprocessing(spacing=[1.7, 2.3, 4.1])
    prepared = preprocess(image, pre)
    liver = sitk.Cast(sitk.DICOMOrient(labels == LIVER, "RAS")[prepared.body_box], sitk.sitkFloat32)
    liver = sitk.SmoothingRecursiveGaussian(liver, 3.0)
    on_grid = sitk.Resample(liver, prepared.grid.sub_image(prepared.volume, (0, 0, 0)), sitk.Transform(),
                            sitk.sitkLinear, 0.0)
    probability = sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0)
    restored = to_input_grid(probability, prepared.grid, image, 0.5, keep_probability=True)
    full = sitk.GetArrayFromImage(sitk.Resample(prepared.grid.sub_image(probability, (0, 0, 0)), image,
                                                sitk.Transform(), sitk.sitkLinear, 0.0))
    assert restored.mask.count > 10000
    assert np.array_equal(restored.mask.array(), full > 0.5)
    assert restored.mean_confidence == pytest.approx(full[full > 0.5].mean(), rel=1e-5)
    assert np.abs(restored.probability.astype(int) - np.rint(full * 255)).max() <= 1
    truth = sitk.GetArrayFromImage(labels) == LIVER
    assert dice(restored.mask.array(), truth) > 0.9


@pytest.mark.parametrize("oblique", [False, True])
def test_restoring_slab_by_slab_equals_restoring_the_whole(oblique):
    """`SlabRestorer` fed x-slabs of uneven heights gives `to_input_grid`'s result on the whole volume:
    same mask (seams between slabs interpolate exactly), the largest component, and the same confidence
    and probabilities up to their uint8 storage. The oblique input exercises the plane-wise seam test."""
    image = sitk.ReadImage(str(SAMPLE))
    if oblique:  # tilt the input's axes by 20 degrees about its z axis
        c, s_ = np.cos(np.radians(20)), np.sin(np.radians(20))
        image.SetDirection((c, -s_, 0.0, s_, c, 0.0, 0.0, 0.0, 1.0))
    labels = sitk.Resample(sitk.ReadImage(str(SAMPLE_LABELS)), image, sitk.Transform(), sitk.sitkNearestNeighbor) \
        if oblique else sitk.ReadImage(str(SAMPLE_LABELS))
    labels.CopyInformation(image)
    prepared = preprocess(image, Preprocessing(spacing=[1.7, 2.3, 4.1]))
    liver = sitk.Cast(sitk.DICOMOrient(labels == LIVER, "RAS")[prepared.body_box], sitk.sitkFloat32)
    on_grid = sitk.Resample(sitk.SmoothingRecursiveGaussian(liver, 3.0),
                            prepared.grid.sub_image(prepared.volume, (0, 0, 0)), sitk.Transform(), sitk.sitkLinear, 0.0)
    probability = sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0)
    probability[:4] = 0.9  # a second, smaller component at the first rows: largest-component must drop it
    whole = to_input_grid(probability, prepared.grid, image, 0.5, keep_probability=True, largest_only=True)
    restorer = SlabRestorer(prepared.grid, image, 0.5, keep_probability=True, largest_only=True, keep_values=True)
    cuts = [0, 7, 8, 30, 61, probability.shape[0]]  # a one-row slab too
    for a, b in zip(cuts, cuts[1:]):
        restorer.add(a, probability[a:b], last=b == probability.shape[0])
    slabs = restorer.finish()
    assert whole.mask.count > 10000
    assert np.array_equal(slabs.mask.array(), whole.mask.array())
    assert slabs.mean_confidence == pytest.approx(whole.mean_confidence, rel=1e-9)
    assert np.abs(slabs.probability.astype(int) - whole.probability.astype(int)).max() <= 1
    assert len(slabs.values) == slabs.mask.count
    # independently: resample everything, keep the largest component, average over it
    full = sitk.GetArrayFromImage(sitk.Resample(prepared.grid.sub_image(probability, (0, 0, 0)), image,
                                                sitk.Transform(), sitk.sitkLinear, 0.0))
    largest = cc3d.largest_k(full > 0.5, k=1, connectivity=26) > 0
    if not oblique:  # (tilted, the added rows touch the liver)
        assert cc3d.connected_components(full > 0.5, connectivity=26).max() > 1  # the rule had something to drop
    assert np.array_equal(slabs.mask.array(), largest)
    assert slabs.mean_confidence == pytest.approx(full[largest].mean(dtype=np.float64), rel=1e-6)


def test_slab_restorer_keeps_no_per_voxel_values_unless_asked():
    """For the largest-component rule alone a class holds only packed bits per slab (plus a few numbers per
    connected component), not a probability per voxel: 32 classes at once on a fine grid stay small."""
    image = sitk.ReadImage(str(SAMPLE))
    prepared = preprocess(image, Preprocessing(spacing=[1.7, 2.3, 4.1]))
    probability = np.full(prepared.volume.shape, 0.8, np.float32)  # everything: the worst case
    restorer = SlabRestorer(prepared.grid, image, 0.5, largest_only=True)
    for a in range(0, probability.shape[0], 20):
        restorer.add(a, probability[a:a + 20], last=a + 20 >= probability.shape[0])
    held = sum(p.bits.nbytes + sum(c.nbytes for c in p.components) for p in restorer._pieces)
    assert all(p.probability is None and p.values is None for p in restorer._pieces)
    voxels = int(np.prod(image.GetSize()))
    assert held < voxels / 7  # 1 bit per voxel (and a little per component)
    restored = restorer.finish()
    covered = sitk.GetArrayFromImage(sitk.Resample(prepared.grid.sub_image(probability, (0, 0, 0)), image,
                                                   sitk.Transform(), sitk.sitkLinear, 0.0)) > 0.5  # the body box
    assert np.array_equal(restored.mask.array(), covered) and covered.sum() > 0.9 * voxels
    assert restored.mean_confidence == pytest.approx(0.8, rel=1e-6)


# --- stitching and memory ----------------------------------------------------------------------------------


def test_windows_cover_the_volume_and_end_flush():
    for size, patch, overlap in [(200, 96, 0.5), (96, 96, 0.5), (130, 96, 0.25), (97, 32, 0.0)]:
        starts = sliding_window.window_starts(size, patch, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + patch] = True
        assert covered.all() and starts[0] == 0 and starts[-1] == size - patch
        assert all(b - a <= int(patch * (1 - overlap)) or overlap == 0 and b - a == patch
                   for a, b in zip(starts, starts[1:]))


def test_stitcher_holds_one_patch_of_rows_per_class_chunk(monkeypatch):
    """The only class-sized buffers are float16 rings of one patch of x-rows (not the model grid), at
    most `class_chunk` classes deep; each class's rows leave in order, exactly once, as slabs."""
    allocations = []
    real_zeros = torch.zeros

    def recording_zeros(*shape, **kwargs):
        out = real_zeros(*shape, **kwargs)
        allocations.append((tuple(out.shape), out.dtype))
        return out

    monkeypatch.setattr(sliding_window.torch, "zeros", recording_zeros)
    thresholds = [0.1 + 0.08 * i for i in range(10)]
    volume = np.random.default_rng(0).random((90, 30, 50), dtype=np.float32)
    slabs = list(sliding_window.probability_slabs(ThresholdModel(thresholds), volume, list(range(10)), [32] * 3,
                                                  0.5, torch.device("cpu"), class_chunk=4))
    monkeypatch.undo()
    stitch = [(s, d) for s, d in allocations if len(s) == 4]
    assert [s[0] for s, _ in stitch] == [4, 4, 2]
    assert all(d == torch.float16 and s[1:] == (32, 32, 50) for s, d in stitch)  # y padded up to one patch
    for position in range(10):
        mine = [s for s in slabs if s.position == position]
        assert [s.last for s in mine] == [False] * (len(mine) - 1) + [True] and len(mine) > 2
        assert [s.start for s in mine] == list(np.cumsum([0] + [s.values.shape[0] for s in mine[:-1]]))
        probability = np.concatenate([s.values for s in mine])
        expected = 1 / (1 + np.exp(-20 * (volume - thresholds[position])))  # a pointwise model survives blending
        assert probability.shape == volume.shape and np.abs(probability - expected).max() < 5e-3


def test_one_window_equals_the_models_own_forward(tiny_model):
    """Stitching a single window (slab-wise heads, float16 accumulation) reproduces sigmoid(model(x))."""
    model = load_model(tiny_model).model
    volume = np.random.default_rng(1).random((32, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        expected = torch.sigmoid(model(torch.from_numpy(volume)[None, None], [4, 0, 2]))[0].numpy()
        got = dict(class_probabilities(model, volume, [4, 0, 2], [32] * 3, 0.5, torch.device("cpu")))
    for position in range(3):
        assert np.abs(got[position] - expected[position]).max() < 2e-3


def test_many_classes_never_hold_all_classes_at_input_resolution():
    """40 classes with large masks: numpy's peak stays well below 40 bool volumes (masks are boxed, bit-packed)."""
    import tracemalloc

    image = sitk.ReadImage(str(SAMPLE))[:, :, 50:80]
    keys = [c.key for c in REG.template_32()] + [c.key for c in REG if not c.template_id][:8]
    thresholds = {k: 0.02 + 0.005 * i for i, k in enumerate(keys)}  # every mask covers most of the body
    voxels = int(np.prod(image.GetSize()))
    model = stub_model(3.0, thresholds, patch=32, overlap=0.0)
    # once untraced: first-call costs (lazy imports, caches; ~1 % of the bound) are not what is measured
    predict(image, model=model, device="cpu", classes=keys[:2])
    tracemalloc.start()
    result = predict(image, model=model, device="cpu")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    vessels = set(postprocess.disjoint_keys([REG[k] for k in keys]))
    organs = set(postprocess.outside_vessel_keys([REG[k] for k in keys]))
    large = {c.info.key for c in result.classes if c.voxel_count > voxels // 3}
    gone = {c.info.key for c in result.classes if c.voxel_count < voxels // 1000}  # a few border voxels stay
    assert len(result.classes) == 40 and {c.info.key for c in result.classes} - vessels - organs <= large
    # nested masks (one threshold each): only the most probable vessel stays, and the organs less
    # probable than it, lying inside it, go
    assert len(vessels) > 5 and len(vessels & large) == 1 and organs <= large | gone and organs & gone
    # 0.6, not 0.5 before session 11: the vessel rule keeps the vessels' uint8 probabilities (11 here,
    # each over most of the body) and needs a few bytes per voxel of one vessel's box while it runs
    assert peak < 40 * voxels * 0.6, f"numpy peak {peak / 1e6:.1f} MB for {voxels / 1e6:.2f} M voxels"
    assert sum(c.box.nbytes for c in result.classes) < 40 * voxels / 7


# --- post-processing on real labels ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def abdomen_labels() -> tuple[sitk.Image, np.ndarray]:
    labels = sitk.ReadImage(str(shared("ct-abdomen", "labels_totalsegmentator_v2.nii.gz")))
    return labels, sitk.GetArrayFromImage(labels)


def test_largest_component_drops_islands(abdomen_labels):
    _, labels = abdomen_labels
    liver = labels == LIVER
    noisy = liver | (labels == SPLEEN)  # the spleen is a separate island
    noisy[0:2, 0:2, 0:2] = True
    kept = postprocess.largest_component(BoxMask.from_array(noisy)).array()
    components, n = ndimage.label(noisy, structure=np.ones((3, 3, 3)))
    largest = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    assert n >= 3 and np.array_equal(kept, largest)
    assert np.count_nonzero(kept & liver) > 0.99 * liver.sum() and not (kept & (labels == SPLEEN)).any()


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
def test_split_pair_puts_real_kidneys_on_their_sides(abdomen_labels, orientation):
    """Both kidneys predicted as 'left': the split must give label 3 to the left and 2 to the right."""
    image, _ = abdomen_labels
    oriented = sitk.DICOMOrient(image, orientation)
    labels = sitk.GetArrayFromImage(oriented)
    both = BoxMask.from_array((labels == KIDNEY_LEFT) | (labels == KIDNEY_RIGHT))
    for left_in, right_in in [(both, BoxMask.empty(both.shape)), (BoxMask.empty(both.shape), both)]:
        left, right = postprocess.split_pair(left_in, right_in, oriented)
        assert np.array_equal(left.array(), labels == KIDNEY_LEFT)
        assert np.array_equal(right.array(), labels == KIDNEY_RIGHT)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_split_pair_keeps_touching_hip_bones_on_their_sides(abdomen_labels, orientation):
    """The real hip bones touch at the symphysis (one component): the split once gave both to the
    right hip and left a tiny island as the left one (the demo's 2 ml left hip). Each side keeps
    its own bone, and a swapped prediction is swapped back."""
    oriented = sitk.DICOMOrient(abdomen_labels[0], orientation)
    labels = sitk.GetArrayFromImage(oriented)
    hip_left, hip_right = labels == HIP_LEFT, labels == HIP_RIGHT
    _, n = ndimage.label(hip_left | hip_right, structure=np.ones((3, 3, 3)))
    assert n == 1  # the case this test is about
    for left_in, right_in in [(hip_left, hip_right), (hip_right, hip_left)]:
        left, right = postprocess.split_pair(BoxMask.from_array(left_in), BoxMask.from_array(right_in), oriented)
        assert np.array_equal(left.array(), hip_left) and np.array_equal(right.array(), hip_right)


def test_split_pair_separates_doubled_kidneys_when_one_is_cut_small(abdomen_labels):
    """Both sides predicted over both kidneys, the right one cut to its lowest slices (~1000 voxels)
    so that the left kidney holds over 3/4 of each side: not a touching pair, still split by side."""
    image, labels = abdomen_labels
    left_kidney, right_kidney = labels == KIDNEY_LEFT, labels == KIDNEY_RIGHT
    per_slice = np.cumsum(right_kidney.sum(axis=(1, 2)))
    right_cut = right_kidney & (per_slice <= 1000)[:, None, None]
    assert 500 < right_cut.sum() and left_kidney.sum() > 3 * right_cut.sum()
    both = BoxMask.from_array(left_kidney | right_cut)
    left, right = postprocess.split_pair(both, both, image)
    assert np.array_equal(left.array(), left_kidney) and np.array_equal(right.array(), right_cut)


def test_split_pair_with_one_kidney_keeps_its_owner(abdomen_labels):
    _, labels = abdomen_labels
    right_only = BoxMask.from_array(labels == KIDNEY_RIGHT)
    left, right = postprocess.split_pair(BoxMask.empty(right_only.shape), right_only, abdomen_labels[0])
    assert left.count == 0 and np.array_equal(right.array(), labels == KIDNEY_RIGHT)


def test_within_parents_keeps_only_the_organ_and_its_margin(abdomen_labels):
    image, labels = abdomen_labels
    liver = labels == LIVER
    grown = ndimage.binary_dilation(liver, np.ones((3, 3, 3)), iterations=3)
    child = grown | (labels == KIDNEY_LEFT)  # a far-away part must go
    radius = postprocess.parent_radius(image, [1.5, 1.5, 1.5])
    assert radius == (1, 1, 1)  # 3 mm at 3 mm voxels
    region = postprocess.parent_region([BoxMask.from_array(liver)], radius)
    kept = postprocess.within(BoxMask.from_array(child), region).array()
    cube = np.ones((3, 3, 3))
    closed = ndimage.binary_erosion(ndimage.binary_dilation(liver, cube, iterations=1, border_value=0),
                                    cube, iterations=1, border_value=1)
    expected = child & ndimage.binary_dilation(closed | liver, cube)
    assert not (kept & (labels == KIDNEY_LEFT) & ~expected).any()
    assert np.array_equal(kept, expected)
    assert (liver & ~kept).sum() == 0 and kept.sum() < grown.sum()


def test_rules_by_registry_order(abdomen_labels):
    """apply_rules: the tumour is cut by the liver's final mask, kidneys split by side."""
    image, labels = abdomen_labels
    liver = labels == LIVER
    tumour = ndimage.binary_dilation(liver, np.ones((3, 3, 3)), iterations=4)
    masks = {"liver": BoxMask.from_array(liver | (labels == SPLEEN)), "liver_tumor": BoxMask.from_array(tumour),
             "kidney_left": BoxMask.from_array((labels == KIDNEY_LEFT) | (labels == KIDNEY_RIGHT)),
             "kidney_right": BoxMask.empty(liver.shape)}
    out = postprocess.apply_rules(masks, {k: REG[k] for k in masks}, image, [1.5] * 3)
    assert np.array_equal(out["liver"].array(), liver)  # spleen island dropped
    assert np.array_equal(out["kidney_right"].array(), labels == KIDNEY_RIGHT)
    assert out["liver_tumor"].count < tumour.sum() and not (out["liver_tumor"].array() & (labels == SPLEEN)).any()


# --- real (random-weight) model: subsets, helpers, progress -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm) -> Path:
    torch.manual_seed(0)
    keys = ["liver", "spleen", "kidney_left", "kidney_right", "liver_tumor", "aorta", "inferior_vena_cava"]
    model, manifest = create_model("tiny-inference", keys, backbone_config={
        "init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}, text_encoder=minilm)
    manifest.preprocessing.spacing = [9.0, 9.0, 9.0]  # a few 32^3 windows: fast on CPU
    manifest.preprocessing.patch_size = [32, 32, 32]
    return save_model(model, manifest, tmp_path_factory.mktemp("models") / "tiny-inference")


def test_subset_run_equals_full_run_and_progress_rises(tiny_model):
    image = sitk.ReadImage(str(SAMPLE))[:, :, 30:100]
    model = load_model(tiny_model)
    calls: list[tuple[float, str]] = []
    full = predict(image, model=model, device="cpu", progress=lambda f, m: calls.append((f, m)))
    subset = predict(image, model=model, classes=["liver tumor", "Left Kidney"], device="cpu")
    assert subset.keys == ["liver_tumor", "kidney_left"]
    # organs bring the vessels: `disjoint` drops an organ's component lying in a vessel
    assert set(subset.metadata["computed_classes"]) == {"liver", "kidney_left", "kidney_right", "liver_tumor",
                                                        "aorta", "inferior_vena_cava"}
    assert any(full[k].voxel_count for k in full.keys)
    vessel = predict(image, model=model, classes=["aorta"], device="cpu")
    assert set(vessel.metadata["computed_classes"]) == {"aorta", "inferior_vena_cava"}
    for result in (subset, vessel):
        for key in result.keys:
            assert np.array_equal(result[key].mask, full[key].mask), key
            assert result[key].mean_confidence == pytest.approx(full[key].mean_confidence, abs=1e-6)
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and len(fractions) > 10
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert "sliding window" in {m for _, m in calls}


def test_chunked_stitching_equals_one_pass(tiny_model):
    image = sitk.ReadImage(str(SAMPLE))[:, :, 50:90]
    model = load_model(tiny_model)
    one = predict(image, model=model, device="cpu", postprocess=False, keep_probabilities=True)
    chunked = predict(image, model=model, device="cpu", postprocess=False, keep_probabilities=True, class_chunk=4)
    for key in one.keys:
        assert np.array_equal(one[key].mask, chunked[key].mask), key
        assert np.array_equal(one[key].probability, chunked[key].probability), key


def test_channels_last_backbone_for_own_models_only(tiny_model):
    # A model `predict` loads itself runs channels-last on CPU (faster oneDNN convolutions); a model
    # the caller passes keeps its contiguous weights. Both must give the same masks up to
    # float rounding at the threshold.
    image = sitk.ReadImage(str(SAMPLE))[:, :, 40:100]
    caller = load_model(tiny_model)
    theirs = predict(image, model=caller, device="cpu", keep_probabilities=True)
    ours = predict(image, model=tiny_model, device="cpu", keep_probabilities=True)
    assert all(p.is_contiguous() for p in caller.model.parameters())
    from UniversalSegLib.inference.request import prepare_model

    own = [p for p in prepare_model(tiny_model, torch.device("cpu")).model.parameters() if p.dim() == 5]
    assert own and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in own)
    compared = 0
    for key in theirs.keys:
        a, b = theirs[key], ours[key]
        assert np.abs(a.probability.astype(int) - b.probability.astype(int)).max() <= 1, key
        if a.mask.sum() > 500:
            assert dice(a.mask, b.mask) > 0.99, key
            compared += 1
    assert compared


def _vessel(mask: np.ndarray, probability: int) -> tuple[BoxMask, np.ndarray]:
    box = BoxMask.from_array(mask)
    return box, np.full(box.count, probability, np.uint8)


def test_disjoint_drops_a_vessel_lying_inside_a_more_probable_one(abdomen_labels):
    """The demo's case: a 'left common carotid artery' wholly inside the real IVC, less probable than
    the IVC there, goes; its other component (on the aorta) stays, and so does the IVC."""
    _, labels = abdomen_labels
    ivc, aorta = labels == IVC, labels == AORTA
    inner = ndimage.binary_erosion(ivc, iterations=1)
    masks, values = {}, {}
    masks["inferior_vena_cava"], values["inferior_vena_cava"] = _vessel(ivc, 240)
    masks["common_carotid_artery_left"], values["common_carotid_artery_left"] = _vessel(inner | aorta, 230)
    out = postprocess.disjoint(masks, values, ["common_carotid_artery_left", "inferior_vena_cava"])
    assert np.array_equal(out["common_carotid_artery_left"].array(), aorta)
    assert out["inferior_vena_cava"] is masks["inferior_vena_cava"]
    # the more probable of the two keeps it
    values["common_carotid_artery_left"][:] = 250
    out = postprocess.disjoint(masks, values, ["common_carotid_artery_left", "inferior_vena_cava"])
    assert out["common_carotid_artery_left"].count == masks["common_carotid_artery_left"].count


def test_disjoint_drops_an_organ_lying_in_a_vessel_but_not_a_vessel_in_an_organ(abdomen_labels):
    """The demo's "heart": 38 ml at 0.81 on the left iliac vein. An organ's component inside a
    vessel more probable there than the organ's mean goes, its other component stays; a vessel
    inside an organ (the IVC inside a "liver" grown over it) is not the organ's to remove."""
    _, labels = abdomen_labels
    vein, liver = labels == ILIAC_VEIN_LEFT, labels == LIVER
    masks, values = {}, {}
    masks["iliac_vena_left"], values["iliac_vena_left"] = _vessel(vein, 250)
    masks["inferior_vena_cava"], values["inferior_vena_cava"] = _vessel(labels == IVC, 240)
    masks["heart"] = BoxMask.from_array(ndimage.binary_erosion(vein) | liver)
    masks["liver"] = BoxMask.from_array(liver | ndimage.binary_dilation(labels == IVC, iterations=2))
    vessels = ["iliac_vena_left", "inferior_vena_cava"]
    out = postprocess.disjoint(masks, values, vessels, {"heart": 0.81, "liver": 0.97})
    assert np.array_equal(out["heart"].array(), liver)
    assert out["liver"] is masks["liver"] and all(out[k] is masks[k] for k in vessels)
    out = postprocess.disjoint(masks, values, vessels, {"heart": 0.99, "liver": 0.97})  # surer than the vein
    assert out["heart"] is masks["heart"]


def test_disjoint_leaves_a_shared_border_alone(abdomen_labels):
    """The iliac artery and vein run side by side: a dilated artery overlapping the vein's border,
    less probable there, keeps every voxel (cutting borders by probability cost the vein 0.05 Dice)."""
    _, labels = abdomen_labels
    artery = ndimage.binary_dilation(labels == ILIAC_ARTERY_LEFT, iterations=2)
    vein = labels == ILIAC_VEIN_LEFT
    assert (artery & vein).any()
    masks, values = {}, {}
    masks["iliac_artery_left"], values["iliac_artery_left"] = _vessel(artery, 200)
    masks["iliac_vena_left"], values["iliac_vena_left"] = _vessel(vein, 250)
    out = postprocess.disjoint(masks, values, ["iliac_artery_left", "iliac_vena_left"])
    assert all(out[k] is masks[k] for k in masks)


def test_needed_classes_adds_parents_and_pairs_and_rejects_unknown(tiny_model):
    manifest = load_model(tiny_model).manifest
    # an organ or a vessel brings the vessels, which `disjoint` compares it with
    vessels = [c.key for c in manifest.registry() if c.group == "vessel" and not c.parents]
    wanted, computed = needed_classes(manifest, ["liver_tumor"])
    assert [c.key for c in wanted] == ["liver_tumor"]
    assert [c.key for c in computed] == ["liver", "liver_tumor", *vessels] and len(vessels) > 1
    _, computed = needed_classes(manifest, ["kidney_right"])
    assert [c.key for c in computed] == ["kidney_left", "kidney_right", *vessels]
    _, computed = needed_classes(manifest, ["aorta"])
    assert [c.key for c in computed] == vessels
    with pytest.raises(UnknownClassError, match="kidney"):
        needed_classes(manifest, ["kidneyy"])


@pytest.mark.parametrize("native_bf16", [False, True])
def test_fast_mode_uses_bfloat16_backbone_only_where_native(tiny_model, monkeypatch, native_bf16):
    # --fast on CPU runs the backbone in bfloat16 only on CPUs that do it natively (else it is slower);
    # the default stays float32. bfloat16 may move borders a little, never the structures.
    import UniversalSegLib.inference.predict as predict_module

    monkeypatch.setattr(predict_module, "cpu_has_native_bf16", lambda: native_bf16)
    image = sitk.ReadImage(str(SAMPLE))[:, :, 40:100]
    model = load_model(tiny_model)
    default = predict(image, model=model, device="cpu")
    fast = predict(image, model=model, device="cpu", fast=True)
    assert default.metadata["mixed_precision"] is False
    assert fast.metadata["mixed_precision"] is native_bf16 and fast.metadata["overlap"] == 0.25
    for key in default.keys:
        a, b = default[key].mask, fast[key].mask
        if a.sum() > 500:
            assert dice(a, b) > 0.8, key


def test_split_pair_keeps_the_side_of_a_kidney_with_a_false_island_far_above(abdomen_labels):
    """Scan B's case: the left kidney's upper pole at the bottom, and a small false 'left kidney'
    high up and further left. Their relative x said nothing of sides, yet it made the kidney 'right'."""
    image, labels = abdomen_labels
    kidney = labels == KIDNEY_LEFT
    island = np.zeros_like(kidney)
    # the island: 3 slices at the top, on the patient's far left (larger LPS x)
    leftmost = 0 if image.TransformIndexToPhysicalPoint((0, 0, 0))[0] > image.TransformIndexToPhysicalPoint(
        (labels.shape[2] - 1, 0, 0))[0] else labels.shape[2] - 1
    xs = slice(0, 4) if leftmost == 0 else slice(labels.shape[2] - 4, labels.shape[2])
    top = slice(labels.shape[0] - 3, labels.shape[0]) if image.GetDirection()[8] > 0 else slice(0, 3)
    island[top, 40:44, xs] = True
    assert not (island & kidney).any()
    left, right = postprocess.split_pair(BoxMask.from_array(kidney | island), BoxMask.empty(kidney.shape), image)
    assert np.array_equal(left.array(), kidney) and right.count == 0
