"""The preprocessing cache, training patches, sampling and augmentation.

Uses the box phantom of test_data_adapters (a 20x16x16 CT with organs at known places).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import demo_spec
from test_data_adapters import BOXES, box, label_map, phantom_ct, write

import UniversalSegLib.data.cache as cache_mod
from UniversalSegLib.data import (
    CachedCase,
    PreprocessedCache,
    build_training_dataset,
    build_validation_cases,
    case_probabilities,
    load_dataset_file,
    load_dataset_specs,
    preprocess_case,
    training_transforms,
)
from UniversalSegLib.store.manifest import Preprocessing

REPO = Path(__file__).resolve().parents[1]
KEYS = ["liver", "spleen", "kidney_left", "kidney_right", "aorta", "urinary_bladder", "heart"]
PRE = Preprocessing(spacing=[1.5] * 3, foreground_crop=False, patch_size=[12, 12, 12])
LO, HI = PRE.hu_window


def make_specs(root: Path, sizes=(1, 1, 1), split=None):
    """Three partially labelled datasets over the phantom: organs (label map, kidney side-less),
    vessels (aorta masks) and pelvis (bladder), with `sizes` cases each."""
    write(root / "ct.nii.gz", phantom_ct())
    write(root / "labels.nii.gz", label_map({"liver": 1, "spleen": 2, "kidney": 3, "urinary_bladder": 4, "aorta": 5}))
    write(root / "aorta.nii.gz", box("aorta").astype(np.uint8))
    case = {"image": "ct.nii.gz", "label": "labels.nii.gz"}
    entries = [
        {"name": "organs", "format": "plain", "root": str(root), "label_map": {1: "liver", 2: "spleen", 3: "kidney"},
         "cases": [{**case, "id": f"o{i}"} for i in range(sizes[0])]},
        {"name": "vessels", "format": "plain", "root": str(root),
         "cases": [{"id": f"v{i}", "image": "ct.nii.gz", "masks": {"aorta": "aorta.nii.gz"}} for i in range(sizes[1])]},
        {"name": "pelvis", "format": "plain", "root": str(root), "label_map": {4: "urinary_bladder", 5: "aorta"},
         "classes": ["urinary_bladder"], "cases": [{**case, "id": f"p{i}"} for i in range(sizes[2])]},
    ]
    if split:
        entries[0]["split"] = split
    return load_dataset_specs(entries, root)


ANNOTATED = {"organs": {"liver", "spleen", "kidney_left", "kidney_right"}, "vessels": {"aorta"},
             "pelvis": {"urinary_bladder"}}


# --- cache --------------------------------------------------------------------------------------------

def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    specs = make_specs(tmp_path / "data")
    cache = PreprocessedCache(tmp_path / "cache")
    assert cache.ensure(specs, KEYS, PRE) == 3
    entry = cache.path(specs[0].cases[0], specs[0], KEYS, PRE)
    stamp = (entry / "image.npy").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached case")

    monkeypatch.setattr(cache_mod, "preprocess_annotated", boom)
    assert cache.ensure(specs, KEYS, PRE) == 0  # all hits: nothing is preprocessed
    assert cache.get(specs[0].cases[0], specs[0], KEYS, PRE).path == entry
    assert (entry / "image.npy").stat().st_mtime_ns == stamp
    # other class order, spacing or annotated classes -> other entries; touching a label file too
    assert cache.path(specs[0].cases[0], specs[0], KEYS[::-1], PRE) != entry
    assert cache.path(specs[0].cases[0], specs[0], KEYS, Preprocessing(spacing=[3.0] * 3)) != entry
    assert cache.path(specs[0].cases[0], specs[2], KEYS, PRE).name.split("-")[-1] != entry.name.split("-")[-1]
    os.utime(tmp_path / "data" / "labels.nii.gz", ns=(stamp + 10**9, stamp + 10**9))
    assert cache.path(specs[0].cases[0], specs[0], KEYS, PRE) != entry
    monkeypatch.undo()
    assert cache.ensure(specs, KEYS, PRE) == 2  # the two cases that use labels.nii.gz


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch, error):
    specs = make_specs(tmp_path / "data")[:1]
    cache = PreprocessedCache(tmp_path / "cache")
    real_save, calls = np.save, []

    def save_then_fail(path, array, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # image.npy is written, then the run dies
            raise error("killed mid-write")
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(cache_mod.np, "save", save_then_fail)
    with pytest.raises(error):
        cache.ensure(specs, KEYS, PRE)
    monkeypatch.undo()
    folder = tmp_path / "cache" / "organs"
    assert len(calls) == 2 and list(folder.iterdir()) == []  # neither an entry nor a temporary folder
    assert not cache.has(specs[0].cases[0], specs[0], KEYS, PRE)
    assert cache.ensure(specs, KEYS, PRE) == 1
    image, labels, annotated = preprocess_case(specs[0].cases[0], specs[0], KEYS, PRE)
    cached = cache.get(specs[0].cases[0], specs[0], KEYS, PRE)
    assert np.array_equal(cached.image(), image) and np.array_equal(cached.labels(), labels)
    assert np.array_equal(cached.annotated, annotated)


def test_cached_case_regions_and_locations(tmp_path):
    specs = make_specs(tmp_path / "data")
    cache = PreprocessedCache(tmp_path / "cache")
    cache.ensure(specs, KEYS, PRE, workers=0, progress=lambda d, t, c: None)
    cached = cache.get(specs[0].cases[0], specs[0], KEYS, PRE)
    _, labels, _ = preprocess_case(specs[0].cases[0], specs[0], KEYS, PRE)
    region = np.s_[3:15, 2:9, 5:16]
    assert np.array_equal(cached.labels(region), labels[(slice(None), *region)])
    assert cached.channels == [0, 1, 2, 3]
    locations = cached.locations()
    assert sorted(locations) == [0, 1, 2, 3]
    for c, points in locations.items():
        assert len(points) == labels[c].sum() and labels[c][tuple(points.T)].all()


def test_parallel_ensure_matches_serial(tmp_path):
    specs = make_specs(tmp_path / "data", sizes=(2, 1, 1))[:2]
    cache = PreprocessedCache(tmp_path / "cache")
    seen = []
    assert cache.ensure(specs, KEYS, PRE, workers=2, progress=lambda d, t, c: seen.append((d, t))) == 3
    assert seen[-1] == (3, 3)
    serial = preprocess_case(specs[1].cases[0], specs[1], KEYS, PRE)[1]
    assert np.array_equal(cache.get(specs[1].cases[0], specs[1], KEYS, PRE).labels(), serial)


# --- patches and sampling -------------------------------------------------------------------------------

def test_training_patches_follow_the_contract(tmp_path):
    specs = make_specs(tmp_path / "data")
    ds = build_training_dataset(specs, KEYS, PRE, tmp_path / "cache", sampling="uniform", samples_per_epoch=24,
                                seed=3, transforms=False)
    assert len(ds) == 24
    spleen_value = (np.clip(60 + 10 * list(BOXES).index("spleen"), LO, HI) - LO) / (HI - LO)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 12, 12, 12) and item["image"].dtype == torch.float32
        assert item["label"].shape == (len(KEYS), 12, 12, 12) and item["label"].dtype == torch.float32
        flags = [k in ANNOTATED[item["dataset"]] for k in KEYS]
        assert item["annotated"].dtype == torch.bool and item["annotated"].tolist() == flags
        assert not item["label"][~item["annotated"]].any()  # unannotated channels are zeros
        assert set(item["label"].unique().tolist()) <= {0.0, 1.0}
        spleen = item["label"][1].bool()
        if spleen.any():  # image and label patches are aligned
            assert torch.allclose(item["image"][0][spleen], torch.tensor(spleen_value, dtype=torch.float32), atol=2e-3)
        seen.add(item["dataset"])
    assert seen == set(ANNOTATED)
    assert all(torch.equal(a, b) for a, b in zip(ds[5].values(), ds[5].values()) if torch.is_tensor(a))
    epoch0 = [ds[i]["label"] for i in range(8)]
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]["label"]) for i, a in enumerate(epoch0))  # new patches each epoch
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["label"].shape == (4, len(KEYS), 12, 12, 12) and len(batch["dataset"]) == 4
    with_aug = build_training_dataset(specs, KEYS, PRE, tmp_path / "cache", samples_per_epoch=4, seed=3)
    assert with_aug[0]["label"].shape == (len(KEYS), 12, 12, 12)  # default augmentation keeps the shape
    assert with_aug.sample_from("vessels", 0)["dataset"] == "vessels"
    compact = build_training_dataset(specs, KEYS, PRE, tmp_path / "cache", samples_per_epoch=24, seed=3,
                                     transforms=False, label_dtype=torch.uint8)
    compact.set_epoch(1)
    assert compact[7]["label"].dtype == torch.uint8 and torch.equal(compact[7]["label"].float(), ds[7]["label"])


def test_padding_and_foreground_ratio(tmp_path):
    specs = make_specs(tmp_path / "data")[1:2]  # the thin aorta: background centres rarely hit it
    big = build_training_dataset(specs, KEYS, PRE, tmp_path / "cache", patch_size=(24, 24, 24),
                                 samples_per_epoch=2, transforms=False)
    item = big[0]
    assert item["image"].shape == (1, 24, 24, 24) and item["label"][4].sum() == box("aorta").sum()

    def hits(fg_fraction):
        ds = build_training_dataset(specs, KEYS, PRE, tmp_path / "cache", patch_size=(4, 4, 4),
                                    samples_per_epoch=300, seed=1, transforms=False, fg_fraction=fg_fraction)
        return np.mean([bool(ds[i]["label"][4].any()) for i in range(len(ds))])

    assert hits(1.0) == 1.0
    assert 0.6 < hits(2 / 3) < 0.82 and hits(0.0) < 0.25


def test_sampling_frequencies_uniform_vs_sqrt(tmp_path):
    specs = make_specs(tmp_path / "data", sizes=(1, 4, 16))
    n = 6000
    for sampling, want in (("uniform", [1 / 3, 1 / 3, 1 / 3]), ("sqrt", [1 / 7, 2 / 7, 4 / 7])):
        ds = build_training_dataset(specs, KEYS, PRE, tmp_path / "cache", sampling=sampling, samples_per_epoch=n,
                                    seed=0, transforms=False)
        names = [ds.entries[ds.case_index(i)][0] for i in range(n)]
        shares = [names.count(d) / n for d in ("organs", "vessels", "pelvis")]
        assert np.allclose(shares, want, atol=0.025), (sampling, shares)
        pelvis = [ds.entries[ds.case_index(i)][1] for i in range(n) if names[i] == "pelvis"]
        assert len(set(pelvis)) == 16  # every case of a dataset is drawn
    assert np.allclose(case_probabilities([1, 4], "sqrt"), [1 / 3] + [1 / 6] * 4)


def test_validation_cases(tmp_path):
    specs = make_specs(tmp_path / "data", sizes=(2, 1, 1), split={"val": ["o1"]})
    val = build_validation_cases(specs, KEYS, PRE, tmp_path / "cache")
    items = list(val)
    assert len(val) == 1 and [(v["dataset"], v["case"]) for v in items] == [("organs", "o1")]
    item = items[0]
    assert item["image"].shape == (1, 20, 16, 16) and item["label"].shape == (len(KEYS), 20, 16, 16)
    assert item["label"].dtype == torch.uint8 and item["annotated"].tolist() == [k in ANNOTATED["organs"] for k in KEYS]
    assert np.array_equal(item["label"][2].numpy().astype(bool), box("kidney_left"))
    assert len(build_validation_cases(specs, KEYS, PRE, tmp_path / "cache", which="all")) == 4
    ds = build_training_dataset(specs, KEYS, PRE, tmp_path / "cache", samples_per_epoch=50, transforms=False)
    assert "o1" not in {e[1] for e in ds.entries}  # held-out cases are never trained on


# --- augmentation ---------------------------------------------------------------------------------------

def test_transforms_move_image_and_label_together_without_flips():
    rng = np.random.default_rng(0)
    label = np.zeros((2, 16, 16, 16), np.float32)
    label[0, 2:7, 3:12, 4:9] = 1  # asymmetric, so a wrong rotation of either key shows
    label[1, 10:14, 1:5, 2:15] = 1
    image = label[:1].copy()
    t = training_transforms((16, 16, 16), zoom=True, rotate_prob=1.0, zoom_prob=1.0, shift_prob=0, scale_prob=0)
    names = [type(x).__name__ for x in t.transforms]
    assert not any("Flip" in n for n in names) and "RandRotate90d" in names and "RandZoomd" in names
    for _ in range(6):
        t.set_random_state(seed=int(rng.integers(1000)))
        out = t({"image": image.copy(), "label": label.copy()})
        img, lab = np.asarray(out["image"]), np.asarray(out["label"])
        assert img.shape == (1, 16, 16, 16) and lab.shape == (2, 16, 16, 16)
        assert set(np.unique(lab)) <= {0.0, 1.0} and not (lab[0] * lab[1]).any()
        inside = img[0] > 0.5
        assert 2 * (inside & (lab[0] > 0)).sum() / (inside.sum() + lab[0].sum()) > 0.9
    assert "RandRotate90d" not in [type(x).__name__ for x in training_transforms((16, 12, 16)).transforms]


# --- the real scans -------------------------------------------------------------------------------------

def test_demo_spec_patches_from_real_scans(tmp_path):
    specs = load_dataset_file(demo_spec(tmp_path))
    keys = list(dict.fromkeys(k for s in specs for k in s.classes))
    pre = Preprocessing(spacing=[3.0] * 3, patch_size=[32, 32, 32])
    ds = build_training_dataset(specs, keys, pre, tmp_path / "cache", samples_per_epoch=12, seed=0, transforms=False)
    by_name = {s.name: set(s.classes) for s in specs}
    for i in range(len(ds)):
        item = ds[i]
        assert item["annotated"].tolist() == [k in by_name[item["dataset"]] for k in keys]
        assert item["label"][item["annotated"]].any() or item["dataset"] == "chest-pa"
    cached = CachedCase.open(ds.entries[0][2])  # scan A as abdomen-organs: kidney sides as labelled
    labels = cached.labels()
    left, right = labels[keys.index("kidney_left")], labels[keys.index("kidney_right")]
    assert np.argwhere(left)[:, 0].mean() < np.argwhere(right)[:, 0].mean()
