"""Domain randomisation (data/synth.py, data/fov.py): synthesis, contrast phases, field of view, coverage,
deformation, reproducibility, and never a left-right flip."""

from __future__ import annotations

import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import shared

from UniversalSegLib.data.fov import (
    TABLE_ID,
    RandomDeformation,
    RandomFOVPad,
    RandomPartialOrgan,
    RandomSlab,
    RandomZoom,
    hu_to_window,
    window_to_hu,
)
from UniversalSegLib.data.synth import (
    ARTERY_NATIVE_HU,
    BODY_ID,
    FAT_ID,
    GAS_ID,
    TISSUES,
    ContrastPhaseAugment,
    SynthesizeFromLabels,
    build_generalisation_pipeline,
    build_structure_map,
    label_map_from_masks,
    rim_mask,
    structure_id,
    tissue_of,
)

SPLEEN, KIDNEY_LEFT, LIVER, AORTA, L1 = 1, 3, 5, 52, 31
QUIET = dict(texture_scale=0.0, p_bias=0.0, p_thick=0.0, p_blur=0.0, noise_hu=(0.0, 0.0), p_gamma=0.0,
             p_random_contrast=0.0)


def ball(shape, centre, radius) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, np.broadcast_to(radius, 3))) <= 1


def phantom(shape=(48, 40, 32)) -> dict:
    """A body (ellipsoid) with liver, spleen, left kidney, aorta and a vertebra, in RAS (dim 0 = toward right)."""
    sm = torch.zeros(shape, dtype=torch.int16)
    sm[ball(shape, [s / 2 for s in shape], [0.45 * shape[0], 0.4 * shape[1], 10 * shape[2]])] = BODY_ID
    parts = {LIVER: ([34, 22, 16], [9, 8, 8]), SPLEEN: ([12, 24, 16], [5, 5, 6]),
             KIDNEY_LEFT: ([14, 12, 16], [4, 5, 7]), AORTA: ([24, 17, 16], [2.5, 2.5, 20]),
             L1: ([24, 10, 16], [4, 3, 5])}
    for sid, (centre, radius) in parts.items():
        sm[ball(shape, centre, radius)] = sid
    keys = ["liver", "spleen", "kidney_left", "aorta", "vertebrae_L1"]
    label = torch.stack([(sm == structure_id(k)).float() for k in keys])
    hu = torch.full(shape, -1000.0)
    for sid, value in {BODY_ID: 40, LIVER: 60, SPLEEN: 45, KIDNEY_LEFT: 30, AORTA: 45, L1: 300}.items():
        hu[sm == sid] = value
    image = hu_to_window(hu)[None]
    return {"image": image, "label": label, "structure_map": sm, "annotated": torch.ones(len(keys), dtype=torch.bool),
            "keys": keys}


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1))


def structure_means(image: torch.Tensor, sm: torch.Tensor) -> dict[int, tuple[float, int]]:
    """Mean window value in the interior (2 voxels from any other structure) of each structure."""
    interior = ~rim_mask(sm.long()[None], 2)[0]
    out = {}
    for sid in torch.unique(sm).tolist():
        m = (sm == sid) & interior
        if m.sum() > 20:
            out[sid] = (float(image[0][m].mean()), int(m.sum()))
    return out


# ----------------------------------------------------------------------------------------------- synthesis


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthesized_structure_means_match_the_sampled_means(seed):
    sample = phantom()
    synth = SynthesizeFromLabels(p=1.0, spacing_mm=3.0, seed=seed, **QUIET)
    out = synth(sample)
    params = synth.last_params[0]
    assert params["synthesized"] and out["image"].shape == sample["image"].shape
    assert out["image"].dtype == torch.float32 and 0 <= out["image"].min() and out["image"].max() <= 1
    torch.testing.assert_close(out["label"], sample["label"])  # labels are untouched
    means = structure_means(out["image"], sample["structure_map"])
    checked = 0
    for sid, (value, _count) in means.items():
        sampled = params["mean_hu"][sid]
        if -165 < sampled < 240:  # inside the window (else clipped)
            assert float(window_to_hu(torch.tensor(value))) == pytest.approx(sampled, abs=8.0), sid
            checked += 1
    assert checked >= 3
    # different sampled means give different image means, in the same order
    ids = sorted(means, key=lambda i: params["mean_hu"][i])
    values = [means[i][0] for i in ids]
    assert values == sorted(values)
    assert max(values) - min(values) > 0.05


def test_arterial_phase_brightens_aorta_and_renal_cortex_native_does_not():
    sample = phantom()
    arterial = SynthesizeFromLabels(p=1.0, spacing_mm=3.0, phase_probs={"arterial": 1.0}, seed=5, **QUIET)
    out = arterial(sample)
    assert arterial.last_params[0]["phase"] == "arterial"
    sm, image = sample["structure_map"], out["image"][0]
    assert image[sm == AORTA].mean() > 0.95  # >= 250 HU: top of the window
    assert image[sm == AORTA].mean() > image[sm == LIVER].mean() + 0.2
    kidney = sm == KIDNEY_LEFT
    rim = rim_mask(sm.long()[None], 1)[0]
    assert image[kidney & rim].mean() > image[kidney & ~rim].mean() + 0.1  # cortex brighter than medulla
    native = SynthesizeFromLabels(p=1.0, spacing_mm=3.0, phase_probs={"native": 1.0}, seed=5, **QUIET)
    aorta_hu = float(window_to_hu(native(sample)["image"][0][sm == AORTA].mean()))
    assert 15 < aorta_hu < 75


def test_split_lumen_lowers_part_of_the_aorta_only_and_never_below_unenhanced_blood():
    """Scan B's dissected aorta: a bright true lumen beside a false lumen of ~230 HU. With
    p_split_lumen the arterial aorta keeps its draw on one side of a random surface and loses 30-90 %
    of its enhancement on the other; every other structure is painted exactly as without it."""
    sample = phantom()
    sm = sample["structure_map"]
    aorta, floor = sm == AORTA, float(hu_to_window(torch.tensor(ARTERY_NATIVE_HU)))
    split_seen = 0
    for seed in range(5):
        plain, split = (SynthesizeFromLabels(p=1.0, spacing_mm=3.0, phase_probs={"arterial": 1.0}, seed=seed,
                                             p_split_lumen=p_split, **QUIET)(sample)["image"][0] for p_split in (0, 1))
        assert torch.equal(plain[~aorta], split[~aorta])
        assert (split[aorta] <= plain[aorta]).all() and (split[aorta] >= floor - 1e-4).all()
        lowered = split[aorta] < plain[aorta] - 0.05
        split_seen += bool(lowered.any() and (~lowered).any())
    assert split_seen >= 3  # the surface usually crosses the aorta


def test_full_randomisation_and_image_wide_steps_change_the_image():
    sample = phantom()
    quiet = SynthesizeFromLabels(p=1.0, spacing_mm=3.0, seed=3, **QUIET)(sample)["image"]
    busy = SynthesizeFromLabels(p=1.0, spacing_mm=3.0, seed=3, p_bias=1, p_thick=1, p_blur=1, p_gamma=1,
                                noise_hu=(30, 40))(sample)["image"]
    body = sample["structure_map"] == BODY_ID
    assert busy[0][body].std() > quiet[0][body].std()  # noise and texture
    synth = SynthesizeFromLabels(p=1.0, spacing_mm=3.0, p_random_contrast=1.0, seed=4)
    synth(sample)
    means = synth.last_params[0]["mean_hu"]
    assert synth.last_params[0]["random_contrast"] and means[0] < -900  # outside stays air
    assert max(means.values()) - min(v for k, v in means.items() if k) > 100


def test_not_synthesized_without_structures_or_with_p0_goes_to_real_transform():
    sample = phantom()
    del sample["structure_map"]
    real = ContrastPhaseAugment(p=1.0, p_label_guided=0, p_remap=0, p_scale_shift=1, scale=(2.0, 2.0), shift=(0, 0),
                                p_thick=0, p_blur=0, p_noise=0, p_gamma=0, seed=0)
    synth = SynthesizeFromLabels(p=1.0, real_transform=real, seed=0)
    out = synth(sample)
    assert not synth.last_params[0]["synthesized"]
    inside = (sample["image"] > 0) & (sample["image"] < 0.5)
    torch.testing.assert_close(out["image"][inside], sample["image"][inside] * 2)
    # with the label channels named, synthesis works from them
    named = SynthesizeFromLabels(p=1.0, class_keys=sample["keys"], spacing_mm=3.0, seed=0, **QUIET)
    out = named(sample)
    assert named.last_params[0]["synthesized"] and structure_id("aorta") in named.last_params[0]["mean_hu"]


# ----------------------------------------------------------------------------------------------- real data


def _abdomen():
    image = nib.as_closest_canonical(nib.load(shared("ct-abdomen", "ct.nii.gz")))
    labels = nib.as_closest_canonical(nib.load(shared("ct-abdomen", "labels_totalsegmentator_v2.nii.gz")))
    return np.asarray(image.dataobj, np.float32), np.asarray(labels.dataobj).astype(np.int16)


def test_structure_map_from_real_abdomen_and_synthesis_looks_like_it():
    hu, labels = _abdomen()
    sm = build_structure_map(hu, labels, spacing_mm=3.0)
    assert sm.dtype == np.int16 and sm.shape == hu.shape
    assert sm[0, 0, 0] == 0 and sm[-1, -1, -1] == 0  # outside the body
    fat = sm == FAT_ID
    assert fat.sum() > 10000 and -190 <= hu[fat].min() and hu[fat].max() < -30
    assert ((sm == BODY_ID) & (labels > 0)).sum() == 0  # labels are kept
    colon = labels == structure_id("colon")
    assert (sm[colon] == GAS_ID).sum() > 1000 and hu[(sm == GAS_ID)].max() < -400  # bowel gas
    table = np.argwhere(sm == TABLE_ID)
    body_ap = np.argwhere(labels > 0)[:, 1]
    assert len(table) > 500 and np.median(table[:, 1]) < body_ap.min()  # the table lies behind the back

    image = hu_to_window(torch.from_numpy(hu))[None]
    sample = {"image": image, "structure_map": torch.from_numpy(sm)}
    synth = SynthesizeFromLabels(p=1.0, spacing_mm=3.0, phase_probs={"native": 1.0}, p_random_contrast=0.0, seed=0)
    out = synth(sample)["image"]
    assert out.shape == image.shape and out.dtype == torch.float32
    smt = torch.from_numpy(sm)
    liver, fat_t, bone = (smt == LIVER), (smt == FAT_ID), (smt == structure_id("hip_left"))
    assert out[0][fat_t].mean() < out[0][liver].mean() < out[0][bone].mean()
    corr = torch.corrcoef(torch.stack([out.flatten(), image.flatten()]))[0, 1]
    assert corr > 0.7, corr  # same anatomy, CT-like intensities


def test_contrast_phase_on_real_image_enhances_and_de_enhances_labelled_vessels():
    hu, labels = _abdomen()
    crop = (slice(30, 90), slice(20, 80), slice(40, 80))
    hu, labels = hu[crop], labels[crop]
    image = hu_to_window(torch.from_numpy(hu))[None]
    sm = torch.from_numpy(labels)
    aorta, bone = sm == AORTA, torch.from_numpy(np.isin(labels, np.arange(25, 34)))  # sacrum..T11
    assert aorta.sum() > 100 and bone.sum() > 1000
    only_phase = dict(p=1.0, p_label_guided=1.0, p_remap=0, p_scale_shift=0, p_thick=0, p_blur=0, p_noise=0,
                      p_gamma=0, spacing_mm=3.0)
    arterial = ContrastPhaseAugment(phase_probs={"arterial": 1.0}, seed=0, **only_phase)
    out = arterial({"image": image, "structure_map": sm})["image"]
    assert arterial.last_phases == ["arterial"]
    assert image[0][aorta].mean() < 0.6 and out[0][aorta].mean() > 0.9  # native 42 HU -> >= 250 HU
    assert abs(float(out[0][bone].mean() - image[0][bone].mean())) < 0.02  # bone is not a contrast organ
    # the same from the label channels of a patch without a structure map
    keys = ["aorta", "liver", "vertebrae_L1"]
    label = torch.stack([(sm == structure_id(k)).float() for k in keys])
    from_labels = ContrastPhaseAugment(phase_probs={"arterial": 1.0}, class_keys=keys, seed=0, **only_phase)
    assert from_labels({"image": image, "label": label})["image"][0][aorta].mean() > 0.9
    # a split lumen: part of the aorta loses some of its new enhancement, none goes below native blood
    split = ContrastPhaseAugment(phase_probs={"arterial": 1.0}, seed=0, p_split_lumen=1.0, **only_phase)
    parts = split({"image": image, "structure_map": sm})["image"][0][aorta & ~rim_mask(sm.long()[None], 1)[0]]
    assert (parts < 0.9).any() and (parts > 0.99).any() and float(window_to_hu(parts.min())) > 0
    # and back: a bright aorta becomes native
    native = ContrastPhaseAugment(phase_probs={"native": 1.0}, seed=0, **only_phase)
    back = native({"image": out, "structure_map": sm})["image"]
    assert 20 < float(window_to_hu(back[0][aorta & ~rim_mask(sm.long()[None], 1)[0]].mean())) < 75


def test_delayed_and_portal_venous_phases_reach_their_literature_ranges():
    """The delayed phase (a stage asks for it with `phase_probs`) and the portal-venous venous range
    widened to the infrarenal IVC's 80 HU: each labelled vessel's interior lands in its phase's range."""
    hu, labels = _abdomen()
    crop = (slice(30, 90), slice(20, 80), slice(40, 80))
    hu, labels = hu[crop], labels[crop]
    image = hu_to_window(torch.from_numpy(hu))[None]
    sm = torch.from_numpy(labels)
    interior = ~rim_mask(sm.long()[None], 1)[0]
    ivc = (sm == structure_id("inferior_vena_cava")) & interior
    aorta = (sm == AORTA) & interior
    assert ivc.sum() > 50 and aorta.sum() > 50
    only_phase = dict(p=1.0, p_label_guided=1.0, p_remap=0, p_scale_shift=0, p_thick=0, p_blur=0, p_noise=0,
                      p_gamma=0, spacing_mm=3.0)
    ivc_means = []
    for seed in range(12):
        delayed = ContrastPhaseAugment(phase_probs={"delayed": 1.0}, seed=seed, **only_phase)
        out = delayed({"image": image, "structure_map": sm})["image"][0]
        assert delayed.last_phases == ["delayed"]
        assert 90 < float(window_to_hu(out[aorta].mean())) < 180  # artery (100, 170) +- the draw's jitter
        venous = ContrastPhaseAugment(phase_probs={"portal_venous": 1.0}, seed=seed, **only_phase)
        ivc_means.append(float(window_to_hu(venous({"image": image, "structure_map": sm})["image"][0][ivc].mean())))
    assert min(ivc_means) < 150 and max(ivc_means) < 215  # 150-200 HU before: never a 90 HU IVC
    assert TISSUES["vein"].mean_range("portal_venous") == (80, 200)
    with pytest.raises(ValueError, match="phase_probs"):
        ContrastPhaseAugment(phase_probs={"late": 1.0})


def _cylinder_share(shape=(32, 32, 12), centre=(15.3, 16.6), radius=4.6, supersample=8) -> torch.Tensor:
    """Share of each voxel inside a cylinder along the last axis (partial volume, by supersampling)."""
    step = (torch.arange(supersample) + 0.5) / supersample
    ys = (torch.arange(shape[0])[:, None] + step[None]).flatten()
    xs = (torch.arange(shape[1])[:, None] + step[None]).flatten()
    inside = ((ys[:, None] - centre[0]) ** 2 + (xs[None] - centre[1]) ** 2 <= radius ** 2).float()
    share = inside.view(shape[0], supersample, shape[1], supersample).mean(dim=(1, 3))
    return share[..., None].expand(shape).contiguous()


def test_phase_change_of_a_bright_lumen_follows_its_partial_volume():
    """An arterial lumen (450 HU, the cache keeps HU above the window) lowered to portal-venous: every
    voxel, partial-volume border included, must look as if the scan had been taken with the new
    lumen value, with no bright ring left around the label (the field was a blurred offset before)."""
    share = _cylinder_share()
    artery_hu, tissue_hu = 450.0, 40.0
    hu = tissue_hu + share * (artery_hu - tissue_hu)
    sm = torch.where(share >= 0.5, torch.tensor(AORTA, dtype=torch.int16), torch.tensor(BODY_ID, dtype=torch.int16))
    image = ((hu + 175.0) / 425.0)[None]  # window scaling, not clipped above
    assert float(image.max()) > 1.4  # the input holds HU above the window
    only_phase = dict(p=1.0, p_label_guided=1.0, p_remap=0, p_scale_shift=0, p_thick=0, p_blur=0, p_noise=0,
                      p_gamma=0, spacing_mm=1.5)
    venous = ContrastPhaseAugment(phase_probs={"portal_venous": 1.0}, seed=3, **only_phase)
    out = window_to_hu(venous({"image": image, "structure_map": sm})["image"][0])
    lumen = float(out[share == 1].mean())
    assert 110 < lumen < 240  # an artery's portal-venous range, and below the window's top
    want = tissue_hu + share * (lumen - tissue_hu)
    border = (share > 0) & (share < 1)
    ring = (share > 0) & (sm == BODY_ID)
    assert float((out - want)[border].abs().max()) < 12, "a partial-volume voxel does not follow the lumen"
    assert float(out[ring].max()) <= lumen, "a ring brighter than the lumen is left around the label"
    assert float((out - want)[share == 0].abs().max()) < 2  # tissue beside it: only the shell offset's blur


def test_training_cache_keeps_hu_above_the_window_and_the_model_gets_the_window(tmp_path):
    """B's lumens (350-700 HU) are over 1 in the cache, not a flat 1; a patch without the generalisation
    pipeline, validation cases and the pipeline's output are all in [0, 1]."""
    from UniversalSegLib.data import DatasetSpec, build_training_dataset, build_validation_cases
    from UniversalSegLib.data.spec import Case, MaskSource
    from UniversalSegLib.store.manifest import Preprocessing

    folder = shared("ct-thorax-aorta")
    case = Case(folder / "ct.nii.gz", [MaskSource(folder / "masks" / "aorta.nii.gz", "aorta")], "b")
    spec = DatasetSpec("angio", [case], ["aorta"])
    pre = Preprocessing(orientation="RAS", spacing=[3.0, 3.0, 3.0], hu_window=[-175.0, 250.0],
                        patch_size=[32, 32, 32])
    data = build_training_dataset([spec], ["aorta"], pre, tmp_path / "cache", transforms=False,
                                  structure_maps=True, samples_per_epoch=4)
    patch = data[0]
    aorta = patch["label"][0] > 0
    lumen = window_to_hu(patch["image"][0][aorta])
    assert aorta.sum() > 50 and float((lumen > 260).float().mean()) > 0.2 and float(lumen.max()) > 450
    pipe = build_generalisation_pipeline(p_synth=0.0, spacing_mm=3.0, class_keys=["aorta"], seed=0)
    assert 0.0 <= float(pipe(patch)["image"].min()) and float(pipe(patch)["image"].max()) <= 1.0
    plain = build_training_dataset([spec], ["aorta"], pre, tmp_path / "cache2", transforms=False, samples_per_epoch=4)
    assert float(plain[0]["image"].max()) <= 1.0
    val = next(iter(build_validation_cases([spec], ["aorta"], pre, tmp_path / "cache2", which="train")))
    assert float(val["image"].max()) == 1.0 and float(val["image"].min()) >= 0.0


# ----------------------------------------------------------------------------------------------- spatial


@pytest.mark.parametrize("label_mode", ["nearest", "bilinear"])
def test_deformation_moves_image_label_and_structures_together(label_mode):
    sample = phantom()
    bright = (sample["structure_map"] == L1)
    sample["image"] = torch.where(bright, 1.0, 0.2)[None]  # only the vertebra is bright
    sample["label"] = torch.cat([sample["label"], sample["label"][:1] * 0, sample["label"]])  # 11 channels, 1 empty
    deform = RandomDeformation(p=1.0, elastic_std_mm=8.0, p_elastic=1.0, spacing_mm=3.0, label_mode=label_mode,
                               seed=11)
    out = deform(sample)
    assert out["image"].shape == sample["image"].shape and out["label"].shape == sample["label"].shape
    assert out["structure_map"].dtype == torch.int16 and out["label"].dtype == torch.float32
    moved = out["label"][4] > 0
    assert dice(moved, bright) < 0.9  # it did move
    assert dice(moved, out["image"][0] > 0.6) > 0.85
    for k, key in enumerate(sample["keys"]):
        assert dice(out["label"][k], out["structure_map"] == structure_id(key)) > 0.85, key
    assert out["label"][5].sum() == 0 and torch.equal(out["label"][:5], out["label"][6:])


def test_zoom_out_shows_a_larger_field_of_view():
    sample = phantom()
    out = RandomZoom(p=1.0, zoom=(0.6, 0.6), seed=0)(sample)
    assert out["image"].shape == sample["image"].shape
    body = out["structure_map"] > 0
    assert body.sum() < 0.5 * (sample["structure_map"] > 0).sum()  # 0.6^2 of the area
    image = out["image"][0]
    assert image[:6].max() == image[-6:].max() == image[:, :5].max() == image[:, -5:].max() == 0  # air margins
    assert out["structure_map"].shape[-1] == 32 and image[:, :, 0].max() > 0  # slices are not zoomed


def test_slab_keeps_the_requested_number_of_slices():
    sample = phantom()
    sample["image"] = sample["image"].clamp(min=0.1)  # no empty slice before the slab
    out = RandomSlab(p=1.0, num_slices=(17, 17), seed=0)(sample)
    kept = torch.nonzero(out["image"][0].flatten(0, 1).amax(0) > 0).flatten()
    assert kept.numel() == 17 and int(kept.max() - kept.min()) == 16  # contiguous
    assert out["image"].shape == sample["image"].shape
    assert out["label"].flatten(1, 2)[:, :, kept].sum() == out["label"].sum() > 0  # labels only in the slab
    crop = RandomSlab(p=1.0, num_slices=(12, 12), mode="crop", seed=0)(sample)
    assert crop["image"].shape[-1] == 12 and crop["label"].shape[-1] == 12 and crop["structure_map"].shape[-1] == 12


def test_fov_pad_adds_air_and_a_table_behind_the_body():
    sample = phantom((64, 56, 8))
    out = RandomFOVPad(p=1.0, fov_mm=(500, 500), spacing_mm=3.0, p_table=1.0, seed=2)(sample)
    assert out["image"].shape == (1, 167, 167, 8) and out["label"].shape == (5, 167, 167, 8)
    assert (out["image"] == 0).float().mean() > (sample["image"] == 0).float().mean() + 0.3
    assert out["label"].sum() == sample["label"].sum()
    table = out["structure_map"] == TABLE_ID
    body = (out["structure_map"] > 0) & ~table
    ap_table = torch.nonzero(table)[:, 1]
    lr_table = torch.nonzero(table)[:, 0]
    assert table.sum() > 0 and ap_table.max() < torch.nonzero(body)[:, 1].min()  # posterior, not overlapping
    assert int(lr_table.max() - lr_table.min()) > 100  # a wide band...
    assert int(ap_table.max() - ap_table.min()) <= (30 + 15) / 3 + 2  # ...that is thin in AP
    assert out["image"][0][table].max() > 0.75  # dense surfaces
    same = RandomFOVPad(p=1.0, fov_mm=(500, 500), spacing_mm=3.0, p_table=1.0, keep_size=True, seed=2)(sample)
    assert same["image"].shape == sample["image"].shape and same["label"].sum() > 0.5 * sample["label"].sum()


def test_partial_organ_is_cut_at_the_border_and_stays_aligned():
    for seed in range(4):
        sample = phantom()
        partial = RandomPartialOrgan(p=1.0, keep=(0.4, 0.6), seed=seed)
        out = partial(sample)
        before, after = sample["label"].sum((1, 2, 3)), out["label"].sum((1, 2, 3))
        cut = partial.last_cut["channel"]
        assert 0.15 * before[cut] < after[cut] < 0.85 * before[cut]
        for k, key in enumerate(sample["keys"]):
            assert torch.equal(out["label"][k] > 0, out["structure_map"] == structure_id(key))


def test_partial_organ_shift_puts_the_cut_on_the_border():
    sample = phantom()
    for seed in range(3):
        partial = RandomPartialOrgan(p=1.0, keep=(0.5, 0.5), max_shift=1.0, seed=seed)
        out = partial(sample)
        cut = partial.last_cut
        mask = out["label"][cut["channel"]] > 0
        end = 0 if cut["kept"] == "high" else mask.shape[cut["dim"]] - 1
        assert cut["shift"] != 0 and mask.index_select(cut["dim"], torch.tensor([end])).any()  # cut on the border
        assert (out["image"][0][~(out["structure_map"] > 0)] < 0.6).all()  # shifted together


# ----------------------------------------------------------------------------------------------- the pipeline


def _all_on(**kw):
    return build_generalisation_pipeline(p_synth=1.0, spacing_mm=3.0, p_deform=1.0, p_zoom=1.0, p_fov=1.0,
                                         p_partial=0.0, p_slab=0.0, **kw)


def test_never_flips_left_and_right():
    """kidney_left and spleen (patient's left: low dim-0 index in RAS) stay left of the liver (right side),
    whatever shifts, rotations, zooms and table the pipeline adds."""
    sample = phantom()
    checked = 0
    for seed in range(10):
        out = _all_on(seed=seed)(sample)
        x = [torch.nonzero(out["label"][k] > 0).float()[:, 0].mean() for k in range(3)]  # liver, spleen, kidney
        for left in (x[1], x[2]):
            if not (left.isnan() or x[0].isnan()):  # a big shift can push one out of the patch
                assert left < x[0] - 10, seed
                checked += 1
    assert checked >= 12


def test_pipeline_is_reproducible_with_a_seed_and_varies_without():
    sample = phantom()
    a, b = _all_on(seed=7)(sample), _all_on(seed=7)(sample)
    for key in ("image", "label", "structure_map"):
        assert torch.equal(a[key], b[key]), key
    c = _all_on(seed=8)(sample)
    assert not torch.equal(a["image"], c["image"])
    pipe = _all_on(seed=None)
    pipe.set_random_state(seed=5)  # what the patch loader calls per patch
    d = pipe(sample)
    pipe.set_random_state(seed=5)
    assert torch.equal(pipe(sample)["image"], d["image"])
    copy = pickle.loads(pickle.dumps(pipe))  # spawned DataLoader workers get pickled copies
    copy.set_random_state(seed=5)
    assert torch.equal(copy(sample)["image"], d["image"])


def test_pipeline_on_loader_patches_numpy_and_batches():
    """The patch loader passes numpy {"image": (1, P, P, P), "label": (A, P, P, P)}; the trainer may pass batches."""
    sample = phantom((32, 32, 32))
    patch = {"image": sample["image"].numpy(), "label": sample["label"].numpy()}
    pipe = build_generalisation_pipeline(p_synth=1.0, spacing_mm=3.0, class_keys=sample["keys"], seed=0,
                                         p_deform=1.0, p_fov=1.0, p_slab=1.0, p_partial=1.0)
    out = pipe(patch)
    assert np.asarray(out["image"]).shape == (1, 32, 32, 32) and np.asarray(out["label"]).shape == (5, 32, 32, 32)
    assert pipe.transforms[-2].last_params[0]["synthesized"]  # synthesised from the named channels
    batch = {k: torch.stack([sample[k], sample[k]]) for k in ("image", "label", "structure_map", "annotated")}
    out = pipe(batch)
    assert out["image"].shape == (2, 1, 32, 32, 32) and out["structure_map"].shape == (2, 32, 32, 32)
    assert not torch.equal(out["image"][0], out["image"][1])  # each sample draws its own parameters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_pipeline_runs_on_gpu():
    sample = phantom((32, 32, 32))
    batch = {k: torch.stack([sample[k]] * 2).cuda() for k in ("image", "label", "structure_map", "annotated")}
    out = _all_on(seed=0)(batch)
    assert out["image"].device.type == "cuda" and out["image"].shape == batch["image"].shape


def test_names_tissues_and_masks():
    assert structure_id("aorta") == 52 and structure_id("celiac_trunk") is not None
    assert tissue_of("kidney_cyst_left") == "fluid" and tissue_of("kidney_left") == "kidney"
    assert tissue_of("pulmonary_artery") == "pulmonary_artery" and tissue_of("iliac_vena_left") == "vein"
    masks = {"aorta": np.ones((2, 2, 2)), "celiac_trunk": np.eye(2)[None].repeat(2, 0), "aorta_true_lumen": np.ones(8)}
    with pytest.raises(ValueError):
        label_map_from_masks(masks, skip_unknown=False)
    masks.pop("aorta_true_lumen")
    lm = label_map_from_masks(masks)
    assert lm.dtype == np.int16 and set(np.unique(lm)) == {52, structure_id("celiac_trunk")}
