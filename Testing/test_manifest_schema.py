"""The typed manifest (store/manifest.py): existing model folders load unchanged; a bad field is one line naming it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from UniversalSegLib.cli import main as cli_main
from UniversalSegLib.errors import ModelFileError
from UniversalSegLib.store import BUNDLED_DIR, DEFAULT_MODEL, Manifest, Preprocessing, read_manifest
from UniversalSegLib.store.integrity import check_record
from UniversalSegLib.store.modelfile import manifest_text, stamp

BUNDLED = Path(BUNDLED_DIR) / DEFAULT_MODEL


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundled_model_loads_with_its_record_untouched():
    before = _sha256(BUNDLED / "manifest.json")
    recorded = check_record(json.loads((BUNDLED / "manifest.json").read_text()), str(BUNDLED))
    assert read_manifest(BUNDLED).integrity_sha256 == recorded
    assert _sha256(BUNDLED / "manifest.json") == before  # reading never re-stamps


def test_a_manifest_with_the_retired_blend_key_loads_with_its_record_untouched(tmp_path):
    """Models written before `preprocessing.blend` was retired (v0.4.1, the bundled model until v0.5.0)."""
    folder = tmp_path / DEFAULT_MODEL
    shutil.copytree(BUNDLED, folder)
    _restamped(folder, lambda d: d["preprocessing"].__setitem__("blend", "gaussian"))
    before = _sha256(folder / "manifest.json")
    data = json.loads((folder / "manifest.json").read_text())
    recorded = check_record(data, str(folder))
    manifest = read_manifest(folder)
    assert manifest.integrity_sha256 == recorded and manifest.preprocessing.spacing == data["preprocessing"]["spacing"]
    assert not hasattr(manifest.preprocessing, "blend")
    assert _sha256(folder / "manifest.json") == before  # reading never re-stamps


def test_to_dict_round_trips_and_omits_the_retired_key():
    manifest = read_manifest(BUNDLED)
    data = manifest.to_dict()
    assert "blend" not in data["preprocessing"]
    assert Manifest.from_dict(json.loads(json.dumps(data))) == manifest


@pytest.fixture
def model_copy(tmp_path):
    folder = tmp_path / DEFAULT_MODEL
    shutil.copytree(BUNDLED, folder)
    return folder


def _restamped(folder: Path, change) -> None:
    """Edit the manifest and stamp it again (a folder whose record is valid but whose content is not)."""
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(manifest_text(stamp(data)))


@pytest.mark.parametrize("change,message", [
    (lambda d: d["preprocessing"].__setitem__("spacing", [1.5, 0, 1.5]),
     "preprocessing.spacing: must be three positive numbers (mm), got [1.5, 0, 1.5]"),
    (lambda d: d["preprocessing"].__setitem__("hu_window", [250, -175]),
     "preprocessing.hu_window: must be [low, high] with low < high, got [250, -175]"),
    (lambda d: d["preprocessing"].__setitem__("foreground_crop", "yes"),
     "preprocessing.foreground_crop: must be true or false, got 'yes'"),
    (lambda d: d.__setitem__("lpg_hidden", 0), "lpg_hidden: must be a positive integer, got 0"),
    (lambda d: d.__setitem__("weights_dtype", "int8"), "weights_dtype: must be float32 or float16, got 'int8'"),
    (lambda d: d.__setitem__("colour_scheme", "dark"), "colour_scheme: unknown key (known: name, backbone"),
    (lambda d: d.pop("backbone"), "backbone: missing (required)"),
])
def test_bad_field_is_one_line_naming_it(model_copy, change, message):
    _restamped(model_copy, change)
    with pytest.raises(ModelFileError) as info:
        read_manifest(model_copy)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_cli_refuses_a_bad_manifest_with_exit_code_2(model_copy, capsys):
    _restamped(model_copy, lambda d: d["preprocessing"].__setitem__("patch_size", [64, 64]))
    assert cli_main(["info", str(model_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("preprocessing.patch_size: must be three positive integers, got [64, 64])")
    assert len(err.splitlines()) == 1


def test_code_built_preprocessing_is_checked_too():
    with pytest.raises(ValueError):
        Preprocessing(spacing=[1.5, 1.5])
    with pytest.raises(ValueError):
        Preprocessing(blend="gaussian")  # retired: only old files may carry it
