"""Model files: safetensors + manifest round trip, checksums, lookup, and the CLI views."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from UniversalSegLib.errors import ModelFileError
from UniversalSegLib.store import create_model, find_model, list_models, load_model, rehash_model, save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def saved_model(tmp_path, minilm):
    torch.manual_seed(0)
    model, manifest = create_model("tiny-test", ["liver", "spleen", "liver_tumor"], backbone="segresnet",
                                   backbone_config={"init_filters": 16}, text_encoder=minilm)
    path = save_model(model, manifest, tmp_path / "tiny-test")
    return model.eval(), path


def test_round_trip_is_bit_exact(saved_model):
    model, path = saved_model
    loaded = load_model(path)
    assert loaded.manifest.class_keys == ["liver", "spleen", "liver_tumor"]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_flipped_byte_fails_checksum(saved_model):
    _, path = saved_model
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="weights changed since the model was stamped"):
        load_model(path)


def test_tampered_manifest_is_refused(saved_model):
    _, path = saved_model
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable model manifest"):
        load_model(path)


def test_restamped_manifest_with_another_architecture_is_one_line(saved_model):
    # a manifest edited and re-stamped (rehash): the weights no longer fit; torch's message has a line per tensor
    _, path = saved_model
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["backbone_config"]["init_filters"] = 8
    (path / "manifest.json").write_text(json.dumps(manifest))
    rehash_model(path)
    with pytest.raises(ModelFileError, match=r"weights do not fit the manifest's architecture \(\d+ problems, e.g. "
                                             r"size mismatch for backbone\.") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_found_by_name_in_user_folder(saved_model, tmp_path, monkeypatch):
    _, path = saved_model
    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(tmp_path))
    assert find_model("tiny-test") == path
    assert "tiny-test" in [m.name for _, m in list_models()]
    with pytest.raises(ModelFileError, match="not found"):
        find_model("no-such-model")


def test_a_folder_without_manifest_or_a_file_is_named_as_such(saved_model, tmp_path):
    _, path = saved_model
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="empty is a folder without a model manifest \\(manifest.json\\)"):
        find_model(tmp_path / "empty")
    weights = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    with pytest.raises(ModelFileError, match=f"{weights.name} is a file, not a model folder"):
        find_model(weights)


def test_no_torch_load_on_model_files():
    """Model files are never unpickled: the only torch.load is the checkpoint importer's."""
    offenders = []
    for py in (REPO / "UniversalSegLib").rglob("*.py"):
        for line in py.read_text().splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{py.name}: {line.strip()}")
    assert offenders == []


def run_cli(*args, env_models: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "UNIVERSALSEG_MODELS": str(env_models)}
    return subprocess.run([sys.executable, "-m", "UniversalSegLib", *args], capture_output=True, text=True,
                          encoding="utf-8", env=env)


def test_cli_info_models_classes(saved_model, tmp_path):
    _, path = saved_model
    info = run_cli("info", str(path), env_models=tmp_path)
    assert info.returncode == 0, info.stderr
    manifest = json.loads(info.stdout)
    assert manifest["weights_sha256"] and manifest["text_encoder"].startswith("minilm")
    models = run_cli("models", "--json", env_models=tmp_path)
    assert "tiny-test" in [m["name"] for m in json.loads(models.stdout)]
    classes = run_cli("classes", "--model", "tiny-test", env_models=tmp_path)
    assert classes.returncode == 0 and "liver_tumor" in classes.stdout


def test_cli_clear_error_on_corruption(saved_model, tmp_path):
    _, path = saved_model
    (path / "weights.safetensors").write_bytes(b"garbage")
    result = run_cli("info", str(path), env_models=tmp_path)
    assert result.returncode == 2
    assert "weights changed" in result.stderr and "Traceback" not in result.stderr


def test_read_tensors_equals_safetensors_and_refuses_truncation(tmp_path):
    """Our windowed loader returns what safetensors' own loader returns, for every dtype we store,
    in memory of its own, and a file cut short is an error, not silently short weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from UniversalSegLib.store.modelfile import read_tensors

    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(6).reshape(2, 3), "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"note": "x"})
    ours, theirs = read_tensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SafetensorError, match="not fully covered"):
        read_tensors(path)
