"""The default model's recipe scripts (training/default_model): patch sampling, refinement start,
the chest-over-abdomen composite, weight averaging.

The scripts are importable through pyproject.toml's pytest `pythonpath` until issue 26a folds them
into `universalseg train` (then these tests move to the package's)."""

from __future__ import annotations

from types import SimpleNamespace

import average
import numpy as np
import pytest
import stacking
import torch
import torch.nn.functional as F
import train as recipe_train


def _whole_volume(volume: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    """Reference: resample the whole volume (what sample_patch did before cropping to the patch's box)."""
    size = torch.tensor(volume.shape[1:], dtype=torch.float32)
    norm = (2 * coords / (size - 1) - 1).flip(-1)[None]
    return F.grid_sample(volume[None].float(), norm, mode=mode, padding_mode="zeros", align_corners=True)[0]


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("seed", range(6))
def test_resampling_the_patch_box_equals_resampling_the_whole_volume(seed, mode):
    """Rotated, scaled patches inside, across and wholly outside the volume's border."""
    g = torch.Generator().manual_seed(seed)
    volume = torch.randint(0, 9, (3, 30, 26, 22), generator=g).to(torch.uint8)
    offsets = torch.arange(12, dtype=torch.float32) - 5.5
    grid = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), -1)
    matrix = recipe_train.random_rotation(g, 40.0, 20.0) * (0.7 + 0.6 * torch.rand(3, generator=g))
    centre = torch.tensor([-12.0, 0.0, 0.0]) + torch.rand(3, generator=g) * torch.tensor([60.0, 30.0, 25.0])
    coords = grid @ matrix.T + centre
    got = recipe_train.resample_at(volume, coords, mode)
    expected = _whole_volume(volume, coords, mode)
    if mode == "bilinear":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    else:  # nearest: a coordinate exactly between two voxels may round either way
        assert (got != expected).float().mean() < 1e-3
    assert got.shape == (3, 12, 12, 12)


def test_patch_carries_its_source_labels_in_model_class_order():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros((2, 30, 30, 30), dtype=torch.uint8)
    labels[0, 10:20, 10:20, 10:20] = 1
    image = torch.rand((1, 30, 30, 30), generator=g)
    fg = [torch.nonzero(labels[0]), torch.zeros((0, 3))]
    source = {"scan": 0, "labels": labels, "idx": torch.tensor([3, 1]), "fg": fg}
    bundle = SimpleNamespace(images=[image], structures=[torch.zeros((1, 30, 30, 30))], sources=[source])
    patch = recipe_train.sample_patch(bundle, source, 16, 1.0, g, 5, spatial_augment=False)
    assert patch["annotated"].nonzero()[:, 0].tolist() == [1, 3]
    assert patch["label"][3].sum() > 0 and patch["label"][[0, 1, 2, 4]].sum() == 0
    assert patch["image"].shape == (1, 16, 16, 16)


def test_refinement_refuses_a_model_with_other_classes():
    from UniversalSegLib.store import load_model

    bundled = load_model()
    keys = bundled.manifest.class_keys
    weights = recipe_train.initial_weights(bundled.path, list(keys))
    assert all(v.dtype == torch.float32 for v in weights.values())
    with pytest.raises(SystemExit, match="other classes"):
        recipe_train.initial_weights(bundled.path, list(reversed(keys)))


def test_heads_to_run_without_exclusion_are_the_annotated_ones():
    annotated = torch.zeros(2, 10, dtype=torch.bool)
    annotated[0, [1, 4]] = annotated[1, 7] = True
    classes, scale = recipe_train.heads_to_run(annotated, 0.0, 3, torch.Generator().manual_seed(0))
    assert classes.tolist() == [1, 4, 7] and scale == 0.0


def test_heads_to_run_sample_unannotated_classes_and_scale_the_exclusion_loss():
    annotated = torch.zeros(2, 10, dtype=torch.bool)
    annotated[0, [1, 4]] = annotated[1, 7] = True
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        classes, scale = recipe_train.heads_to_run(annotated, 5.0, 3, gen)
        assert {1, 4, 7} <= set(classes.tolist()) and len(classes) == 6
        assert classes.tolist() == sorted(classes.tolist())
        assert scale == pytest.approx(7 / 3)  # 7 unannotated classes, 3 sampled per step
        seen |= set(classes.tolist()) - {1, 4, 7}
    assert seen == {0, 2, 3, 5, 6, 8, 9}  # every unannotated class gets its turn
    every, scale = recipe_train.heads_to_run(annotated, 5.0, 0, gen)  # 0: all heads, unscaled
    assert every.tolist() == list(range(10)) and scale == 1.0


def test_generalise_overrides_replace_known_probabilities_only():
    recipe = {"generalise": {"p_slab": 0.35, "p_synth": 0.3}}
    assert recipe_train.generalise_settings(recipe, ["p_slab=0.5"]) == {"p_slab": 0.5, "p_synth": 0.3}
    assert recipe["generalise"]["p_slab"] == 0.35  # the recipe itself is left alone
    with pytest.raises(SystemExit, match="no 'p_slap'"):
        recipe_train.generalise_settings(recipe, ["p_slap=0.5"])


def test_fit_plane_crops_around_the_centre_and_pads_symmetrically():
    volume = np.arange(10 * 8 * 3).reshape(10, 8, 3)
    crop = stacking.fit_plane(volume, (4, 8), (7.0, 4.0), fill=-1)
    assert np.array_equal(crop, volume[5:9])  # centred on x=7
    edge = stacking.fit_plane(volume, (4, 8), (9.5, 4.0), fill=-1)
    assert np.array_equal(edge, volume[6:10])  # held inside the array
    padded = stacking.fit_plane(volume, (13, 8), (0.0, 0.0), fill=-1)
    assert padded.shape == (13, 8, 3) and np.array_equal(padded[1:11], volume)
    assert (padded[0] == -1).all() and (padded[11:] == -1).all()


def test_chest_block_starts_above_the_anchor_and_sits_on_top_of_the_abdomen():
    heart = np.zeros((4, 4, 20), bool)
    heart[1:3, 1:3, 5:12] = True
    assert stacking.lowest_slice_above(heart, 6.0, 3.0) == 7
    with pytest.raises(ValueError, match="empty"):
        stacking.lowest_slice_above(np.zeros_like(heart), 6.0, 3.0)
    below = {"image": np.full((8, 6, 5), 0.5, np.float16), "liver": np.ones((8, 6, 5), bool)}
    above = {"image": np.full((4, 4, 3), 0.9, np.float16), "heart": np.ones((4, 4, 3), bool)}
    out = stacking.stack_above(below, above, (2.0, 3.0))
    assert out["image"].shape == (4, 4, 8) and out["image"].dtype == np.float16
    assert (out["image"][..., :5] == np.float16(0.5)).all() and (out["image"][..., 5:] == np.float16(0.9)).all()
    # each side's classes are absent from the other block (that is what the composite annotates)
    assert out["liver"][..., :5].all() and not out["liver"][..., 5:].any()
    assert out["heart"][..., 5:].all() and not out["heart"][..., :5].any()


def test_prepare_builds_the_chest_over_abdomen_source_the_recipe_names():
    import prepare

    recipe = prepare.load_recipe()
    names = [s["name"] for s in recipe["sources"]]
    spec = next(s["stack"] for s in recipe["sources"] if "stack" in s)
    assert names.index(spec["below"]) < names.index(spec["above"]) < len(names)  # built from earlier sources
    aorta = 52  # synth.structure_id("aorta")
    structure_a = np.zeros((10, 8, 6), np.int16)
    structure_a[6:8, 3:5] = aorta
    heart = np.zeros((4, 4, 9), bool)
    heart[..., 2:] = True
    arrays = {"image_0": np.full((10, 8, 6), 0.2, np.float16), "structure_0": structure_a,
              "image_1": np.arange(9, dtype=np.float16)[None, None].repeat(4, 0).repeat(4, 1),
              "structure_1": np.zeros((4, 4, 9), np.int16)}
    done = {"abdomen": {"scan": 0, "masks": {"liver": np.ones((10, 8, 6), bool)}},
            "chest": {"scan": 1, "masks": {"heart": heart}}}
    source = {"stack": {"below": "abdomen", "above": "chest", "above_from": {"lowest": "heart", "mm": 6.0},
                        "centre_on": "aorta"}}
    out = prepare.stacked_source(source, done, arrays, (3.0, 3.0, 3.0))
    assert out["image"].shape == (4, 4, 6 + 5)  # the chest from slice 2 + 6 mm / 3 mm = 4 on
    assert np.array_equal(out["image"][0, 0, 6:], np.arange(4, 9, dtype=np.float16))
    # A's 10 x 8 plane cropped to 4 x 4 around its aorta (x 6-7, y 3-4): all of the aorta is kept
    assert (out["structure_map"][2:4, 1:3, :6] == aorta).all() and (out["structure_map"] == aorta).sum() == 24
    assert out["liver"][..., :6].all() and not out["liver"][..., 6:].any() and out["heart"][..., 6:].all()


def test_prepare_records_each_sources_data_hash(tmp_path):
    """Issue 23: the bundle names each source's data by a SHA-256 over its files (a stacked source's
    over its parts'), which the model's provenance records; a changed mask changes it."""
    import prepare

    for name in ("ct.nii.gz", "labels.nii.gz", "aorta.nii.gz"):
        (tmp_path / name).write_bytes(name.encode())
    plain = {"name": "a", "image": "ct.nii.gz", "label_map": "labels.nii.gz", "masks": {"aorta": "aorta.nii.gz"}}
    hashes = {"a": prepare.source_sha256(plain, tmp_path, {}), "b": prepare.source_sha256(
        {"name": "b", "image": "ct.nii.gz"}, tmp_path, {})}
    stacked = prepare.source_sha256({"stack": {"below": "a", "above": "b"}}, tmp_path, hashes)
    assert len({*hashes.values(), stacked}) == 3
    (tmp_path / "aorta.nii.gz").write_bytes(b"edited")
    assert prepare.source_sha256(plain, tmp_path, {}) != hashes["a"]


def test_average_interpolates_weights_and_records_it(tmp_path, minilm):
    """v0.4.1 is 0.7 x stage 2f + 0.3 x stage 2d: each float tensor is the mix, the version and a
    provenance stage say so, and models with other classes are refused."""
    from UniversalSegLib.errors import UniversalSegError
    from UniversalSegLib.store import create_model, load_model, save_model

    config = {"init_filters": 16, "blocks_down": [1, 1], "blocks_up": [1]}
    folders = []
    for seed, keys in ((0, ["liver", "spleen"]), (1, ["liver", "spleen"]), (2, ["liver", "aorta"])):
        torch.manual_seed(seed)
        model, manifest = create_model(f"m{seed}", keys, backbone_config=config, text_encoder=minilm)
        folders.append(str(save_model(model, manifest, tmp_path / f"m{seed}")))
    out = tmp_path / "mixed"
    average.average(folders[0], folders[1], 0.3, "9.9.9", str(out))
    mixed, refined, parent = (load_model(p).model.state_dict() for p in (out, *folders[:2]))
    for key, value in mixed.items():
        if value.is_floating_point():  # stored in float16, like the bundled model
            assert torch.allclose(value, 0.7 * refined[key] + 0.3 * parent[key], atol=2e-3, rtol=2e-3), key
    manifest = load_model(out).manifest
    assert manifest.version == "9.9.9" and manifest.provenance["stages"][-1]["parent_weight"] == 0.3
    parents = [load_model(p).manifest for p in folders[:2]]  # issue 23: lineage by integrity hash
    assert [(a["name"], a["integrity_sha256"], a["weight"]) for a in manifest.provenance["averaged_from"]] == \
        [(m.name, m.integrity_sha256, w) for m, w in zip(parents, (0.7, 0.3))]
    with pytest.raises(UniversalSegError, match="classes or architecture"):
        average.average(folders[0], folders[2], 0.3, "9.9.9", str(tmp_path / "refused"))
