"""One resolved request from the CLI to `predict` (inference/request.py): every check once, before the model runs."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
from conftest import shared
from test_dicom_input import write_series

import UniversalSegLib.io.dicom_input as dicom_input
from UniversalSegLib.cli import main


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory):
    """12 axial slices (3 mm) of the real abdomen CT, written as a DICOM series."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(shared("ct-abdomen", "ct_small.nii.gz"))), "LPS")[:, :, 10:22]
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_series(folder, image)
    return folder


def _counting(monkeypatch, name: str) -> list:
    calls, original = [], getattr(dicom_input, name)

    def counted(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(dicom_input, name, counted)
    return calls


@pytest.mark.parametrize("formats", [["--formats", "stats,dicom-seg"], []])  # asked for, or a default
def test_cli_predict_scans_a_dicom_folder_once(dicom_folder, tmp_path, monkeypatch, formats):
    # the folder scan reads every header; the dicom-seg checks (CLI, writer) and the SEG writer reuse them
    scans, headers = _counting(monkeypatch, "scan_folder"), _counting(monkeypatch, "read_header")
    code = main(["predict", str(dicom_folder), "-o", str(tmp_path / "out"), "--classes", "liver",
                 "--device", "cpu", *formats])
    assert code == 0
    assert (tmp_path / "out" / "segmentation.dcm").exists()
    assert scans == [dicom_folder]
    assert sorted(headers) == sorted(dicom_folder.iterdir())  # each file's header once


def test_a_typo_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    import UniversalSegLib.inference.request as request_module
    from UniversalSegLib.errors import UnknownClassError

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the class names were checked")

    monkeypatch.setattr(request_module, "load_model", no_loading)
    image = sitk.ReadImage(str(shared("ct-abdomen", "ct_small.nii.gz")))
    with pytest.raises(UnknownClassError, match="kidney"):
        request_module.resolve_request(image, classes=["kidneyy"], device="cpu", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_takes_a_request_and_nothing_but_progress_beside_it():
    from UniversalSegLib.inference.predict import predict
    from UniversalSegLib.inference.request import PredictSettings, resolve_request

    image = sitk.ReadImage(str(shared("ct-abdomen", "ct_small.nii.gz")))[:, :, 10:22]
    request = resolve_request(image, classes=["gallbladder"], device="cpu",
                              settings=PredictSettings(postprocess=False))
    assert [c.key for c in request.wanted] == ["gallbladder"] and request.model.manifest.name
    with pytest.raises(TypeError, match="fast"):
        predict(request, fast=True)
    seen = []
    result = predict(request, progress=lambda f, m: seen.append(f))
    assert result.keys == ["gallbladder"] and seen[-1] == 1.0
    assert result.metadata["postprocessed"] is False and result.metadata["read_and_load_s"] == request.resolve_s
