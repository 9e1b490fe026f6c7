"""Class-subset windows (`inference/roi.py`): a coarse pass bounds the windows of a subset request."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_DIR

from UniversalSegLib.inference import roi
from UniversalSegLib.inference.predict import load_for_inference, predict
from UniversalSegLib.inference.sliding_window import ProbabilitySlab

SAMPLE = SAMPLE_DIR / "ct_abdomen.nii.gz"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def test_embedded_slabs_cover_every_row_with_zeros_outside_the_roi():
    shape, box = (20, 6, 7), ((5, 12), (1, 4), (2, 7))
    rng = np.random.default_rng(0)
    inside = rng.random((2, 7, 3, 5)).astype(np.float32)  # 2 classes on the ROI
    stream = [ProbabilitySlab(p, s, inside[p, s:e], e == 7) for p in (0, 1) for s, e in ((0, 3), (3, 7))]
    rows: dict[int, list[ProbabilitySlab]] = {0: [], 1: []}
    for slab in roi.embedded(iter(stream), box, shape):
        rows[slab.position].append(slab)
    for position, slabs in rows.items():
        assert [s.start for s in slabs] == sorted(s.start for s in slabs) and slabs[0].start == 0
        assert [s.last for s in slabs] == [False] * (len(slabs) - 1) + [True]
        whole = np.concatenate([s.values for s in slabs])
        expected = np.zeros(shape, np.float32)
        expected[5:12, 1:4, 2:7] = inside[position]
        assert np.array_equal(whole, expected)


def test_grown_box_has_a_margin_and_at_least_one_patch():
    assert roi.grown(((40, 50), (0, 99), (10, 90)), (122, 99, 112), (64, 64, 64)) == ((13, 77), (0, 99), (0, 106))
    assert roi.grown(((0, 10), (0, 10), (0, 10)), (30, 99, 112), (64, 64, 64)) == ((0, 30), (0, 64), (0, 64))


@pytest.fixture(scope="module")
def upper_abdomen() -> sitk.Image:
    """The sample CT's upper 56 slices (liver, spleen and above), every column: a real crop."""
    return sitk.ReadImage(str(SAMPLE))[:, :, 56:]


@pytest.fixture(scope="module")
def full_spleen(upper_abdomen):
    """The spleen (and the vessels its rule needs) on the full grid of windows."""
    model = load_for_inference(None, "cpu")
    return model, predict(upper_abdomen, model=model, classes="spleen", device="cpu", subset_windows=False)


def test_spleen_subset_runs_fewer_windows_and_matches_the_full_run(upper_abdomen, full_spleen):
    model, full = full_spleen
    subset = predict(upper_abdomen, model=model, classes="spleen", device="cpu")
    assert subset.metadata["window_roi"] is not None and "window_roi" not in full.metadata
    assert subset.metadata["windows"] < subset.metadata["full_grid_windows"]
    spleen, reference = subset["spleen"].mask, full["spleen"].mask
    assert np.count_nonzero(reference) > 2_000
    assert dice(spleen, reference) >= 0.97


def test_coarse_pass_finding_nothing_runs_the_full_grid(upper_abdomen, full_spleen, monkeypatch):
    monkeypatch.setattr(roi, "coarse_box", lambda *args, **kwargs: None)
    model, full = full_spleen
    found_nothing = predict(upper_abdomen, model=model, classes="spleen", device="cpu")
    assert found_nothing.metadata["window_roi"] is None
    assert np.array_equal(found_nothing["spleen"].mask, full["spleen"].mask)


@pytest.mark.parametrize("flag, expected", [([], True), (["--full-grid"], False)])
def test_cli_full_grid_turns_the_subset_windows_off(flag, expected, monkeypatch, tmp_path):
    """`--full-grid` is how a user gets, for a class subset, the masks of a run of all classes."""
    from UniversalSegLib.cli import main as cli
    from UniversalSegLib.inference import request

    seen = {}

    def capture(*args, settings=None, **kwargs):
        seen["settings"] = settings
        raise request.InputError("stop here")  # the settings are all this test needs

    monkeypatch.setattr(request, "resolve_request", capture)
    code = cli(["predict", str(SAMPLE), "-o", str(tmp_path / "out"), "--classes", "liver", *flag])
    assert code == 2 and seen["settings"].subset_windows is expected


def test_a_scan_of_one_window_runs_no_coarse_pass(monkeypatch):
    """The coarse pass costs a window; where the full grid is one window it cannot pay, so it is skipped."""
    calls = []
    monkeypatch.setattr(roi, "coarse_box", lambda *args, **kwargs: calls.append(1))
    loaded = load_for_inference(None, "cpu")
    small = sitk.ReadImage(str(SAMPLE))[20:60, 30:70, 40:60]  # 120 x 120 x 60 mm: one 64^3 window at 3 mm
    result = predict(small, model=loaded, classes="spleen", device="cpu")
    assert calls == [] and result.metadata["windows"] == result.metadata["full_grid_windows"] == 1
