"""`universalseg predict`: outputs on the sample CT, JSON progress for Slicer, clean failures leaving no files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from conftest import SAMPLE_DIR, shared

from UniversalSegLib.cli import main
from UniversalSegLib.store import create_model, save_model

SAMPLE = SAMPLE_DIR / "ct_abdomen.nii.gz"
KEYS = ["liver", "spleen", "kidney_left", "kidney_right", "liver_tumor"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, minilm) -> Path:
    """A user model folder holding one tiny random-weight model, `tiny-cli`."""
    torch.manual_seed(1)
    model, manifest = create_model("tiny-cli", KEYS, backbone_config={
        "init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}, text_encoder=minilm)
    manifest.preprocessing.spacing = [9.0, 9.0, 9.0]
    manifest.preprocessing.patch_size = [32, 32, 32]
    folder = tmp_path_factory.mktemp("cli_models")
    save_model(model, manifest, folder / "tiny-cli")
    return folder


def test_predict_writes_seg_nrrd_masks_and_stats_with_json_progress(models_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "UNIVERSALSEG_MODELS": str(models_dir), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "UniversalSegLib", "predict", str(SAMPLE), "-o", str(out),
                          "--model", "tiny-cli", "--device", "cpu", "--progress-json"],
                         capture_output=True, text=True, encoding="utf-8", env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    fractions = [d["progress"] for d in lines[:-1]]
    assert fractions[-1] == 1.0 and all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert all(set(d) == {"progress", "message"} for d in lines[:-1])
    done = lines[-1]
    assert done["done"] is True and {"seg.nrrd", "nifti", "stats"} <= set(done["outputs"])
    assert all(Path(p).exists() for p in done["outputs"].values())

    segmentation = slicerio.read_segmentation(done["outputs"]["seg.nrrd"])
    assert [s["id"] for s in segmentation["segments"]] == KEYS
    reference = sitk.ReadImage(str(SAMPLE))
    for key in KEYS:
        mask = sitk.ReadImage(str(out / "masks" / f"{key}.nii.gz"))
        assert mask.GetSize() == reference.GetSize() and mask.GetOrigin() == reference.GetOrigin()
        assert np.allclose(mask.GetSpacing(), reference.GetSpacing())
        assert np.allclose(mask.GetDirection(), reference.GetDirection())
    rows = json.loads((out / "statistics.json").read_text())
    assert "liver" in json.dumps(rows)


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    flat = sitk.Image(64, 64, sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    nan = sitk.GetImageFromArray(np.full((20, 30, 30), np.nan, dtype=np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.nii.gz"))
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image at all")
    return {
        "missing": (tmp_path / "missing.nii.gz", []),
        "2D": (tmp_path / "flat.nii.gz", []),
        "NaN": (tmp_path / "nan.nii.gz", []),
        "unreadable": (tmp_path / "garbage.nii.gz", []),
        "MR": (shared("mr-abdomen", "mr_small.nii.gz"), []),
        "unknown class": (SAMPLE, ["--classes", "liver", "kidneyy"]),
        "unknown format": (SAMPLE, ["--formats", "seg.nrrd,jpeg"]),
        "DICOM SEG of a NIfTI": (SAMPLE, ["--formats", "dicom-seg"]),
        "unknown model": (SAMPLE, ["--model", "no-such-model"]),
    }


@pytest.mark.parametrize("case", ["missing", "2D", "NaN", "unreadable", "MR", "unknown class", "unknown format",
                                  "DICOM SEG of a NIfTI", "unknown model"])
def test_bad_input_exits_2_with_one_line_and_no_files(case, models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(models_dir))
    path, extra = bad_inputs(tmp_path)[case]
    out = tmp_path / "new_out"
    code, err = run_main(["predict", str(path), "-o", str(out), "--model", "tiny-cli", *extra], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("universalseg: error:"), err
    assert not out.exists()


def test_failure_while_writing_leaves_existing_folder_as_it_was(models_dir, tmp_path, monkeypatch, capsys):
    from UniversalSegLib.errors import UniversalSegError
    from UniversalSegLib.io import writers

    def broken(*args, **kwargs):
        (tmp_path / "out" / "half-written.nrrd").write_text("x")
        raise UniversalSegError("disk full")

    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(models_dir))
    monkeypatch.setattr(writers, "write_outputs", broken)
    import UniversalSegLib.io as io

    monkeypatch.setattr(io, "write_outputs", broken)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    image = sitk.ReadImage(str(SAMPLE))[:, :, 60:90]
    sitk.WriteImage(image, str(tmp_path / "slab.nii.gz"))
    code, err = run_main(["predict", str(tmp_path / "slab.nii.gz"), "-o", str(out), "--model", "tiny-cli",
                          "--classes", "spleen", "--progress-json"], capsys)
    assert code == 2 and err == ["universalseg: error: disk full"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_a_run_removes_our_outputs_an_earlier_run_left_and_only_when_it_succeeds(models_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    """Run 1 writes the default formats, run 2 only the statistics: run 1's masks and seg.nrrd no longer belong
    to what the folder holds, so they go (named in one line); a user's own files stay. A run that fails while
    writing removes nothing."""
    from UniversalSegLib.io import writers

    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(models_dir))
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE))[:, :, 60:90], str(tmp_path / "slab.nii.gz"))
    out = tmp_path / "out"
    run = ["predict", str(tmp_path / "slab.nii.gz"), "-o", str(out), "--model", "tiny-cli", "--classes", "liver",
           "spleen", "--progress-json", "--formats"]
    code, err = run_main([*run, "seg.nrrd,nifti,labelmap,stats"], capsys)
    assert code == 0 and err == [], err
    (out / "notes.txt").write_text("mine")
    (out / "masks" / "README.txt").write_text("mine too")

    code, err = run_main([*run, "stats"], capsys)
    assert code == 0, err
    assert err == [f"universalseg: warning: removed the outputs of an earlier run in {out} that this run did not "
                   "write, so the folder holds this run's results only: segmentation.seg.nrrd, masks/ (2 masks), "
                   "labelmap.nii.gz, labelmap.labels.json, labelmap-colors.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["masks", "notes.txt", "statistics.csv", "statistics.json"]
    assert [p.name for p in (out / "masks").iterdir()] == ["README.txt"]
    statistics = (out / "statistics.json").read_text()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers, "write_seg_nrrd", disk_full)
    code, err = run_main([*run, "seg.nrrd"], capsys)
    assert code == 2 and len(err) == 1 and "No space left on device; nothing was written" in err[0], err
    assert (out / "statistics.json").read_text() == statistics and (out / "statistics.csv").exists()
