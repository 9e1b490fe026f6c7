"""Importing the published CLIP-Driven Universal Model checkpoints (issue 7).

State dicts are built in the published layout from the reference's key manifests (every name and
shape, random values), saved with torch.save, imported, and checked tensor by tensor. Forward
passes run on small inputs on CPU; the (1, 32, 96, 96, 96) output shape of the published
configuration is checked on the meta device (shapes only, no arithmetic). Numerical equivalence
with the authors' code is checked outside this suite (it cannot ship their code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import SAMPLE_DIR
from support import published_layout
from torch import nn

from UniversalSegLib.cli import main as cli_main
from UniversalSegLib.errors import InputError, ModelFileError
from UniversalSegLib.importers.clip_driven_universal import (
    LICENSE,
    build_imported_model,
    import_checkpoint,
)
from UniversalSegLib.model.genesis_unet import BatchStatsNorm3d, UpStage, upsample_2x
from UniversalSegLib.model.swin_merging import ReferencePatchMerging
from UniversalSegLib.registry import default_registry
from UniversalSegLib.store import load_model, sha256_file

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"  # copies of ../shared/reference's key manifests
# Small inputs each backbone accepts (Swin: multiples of 32 and more than one voxel at 1/32 resolution).
SMALL_INPUT = {"unet": (16, 16, 16), "swinunetr": (32, 32, 64)}


class NotATensor:
    """A custom object: a weights-only reader must refuse a pickle holding one."""


def published_shapes(backbone: str) -> dict[str, list[int]]:
    path = REFERENCE / f"published_universal_model_{backbone}_keys.json"
    if not path.is_file():
        pytest.skip(f"reference key manifest {path} not available")
    return json.loads(path.read_text())["state_dict_shapes"]


def random_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the published names and shapes (valid indices for the index buffers)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("relative_position_index"):
            state[name] = torch.randint(0, 13 ** 3, shape, generator=g)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * 0.05
    return state


def as_published(state: dict[str, torch.Tensor], backbone: str, module: bool = True,
                 bare_swin: bool = False) -> dict[str, torch.Tensor]:
    """The key spellings of the published files: `module.` (DataParallel), Swin backbone without `backbone.`."""
    out = {}
    for name, value in state.items():
        if bare_swin and name.startswith("backbone."):
            name = name.removeprefix("backbone.")
        out[("module." if module else "") + name] = value
    return out


@pytest.fixture(scope="module")
def unet_state() -> dict[str, torch.Tensor]:
    return random_state(published_shapes("unet"))


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], wrapped: bool = True) -> Path:
    """As the authors' training script saves it: state dict, optimizer and scheduler states, epoch."""
    optimizer = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 1e-5, "amsgrad": False,
                                   "params": [0]}]}
    scheduler = {"warmup_epochs": 10, "max_epochs": 1000, "base_lrs": [1e-4], "last_epoch": 11, "verbose": False}
    torch.save({"net": state, "optimizer": optimizer, "scheduler": scheduler, "epoch": 11} if wrapped else state, path)
    return path


@pytest.mark.parametrize("backbone, module, bare_swin, wrapped, run", [
    ("unet", True, False, True, True),            # the published file's layout
    ("unet", False, False, False, True),          # a bare state dict with the manifest's names
    ("swinunetr", True, True, True, True),        # the published file's layout
    ("swinunetr", False, False, False, False),    # (no second Swin forward: ~7 s on CPU)
])
def test_published_layout_imports_every_tensor(tmp_path, backbone, module, bare_swin, wrapped, run):
    state = random_state(published_shapes(backbone), seed=1)
    ckpt = save_checkpoint(tmp_path / f"{backbone}.pth", as_published(state, backbone, module, bare_swin), wrapped)
    folder = import_checkpoint(ckpt, backbone, output_dir=tmp_path / "models", sha256=sha256_file(ckpt).upper())
    assert folder == tmp_path / "models" / f"clip-driven-universal-{backbone}"

    loaded = load_model(folder)
    ours = loaded.model.state_dict()
    assert len(ours) == len(state)  # nothing of ours left unfilled, nothing of theirs dropped
    prefix = "backbone.net." if backbone == "swinunetr" else "backbone."
    renames = {"organ_embedding": "class_embeddings", "GAP.": "image_feature_head.",
               "precls_conv.": "voxel_feature_head.", "controller.": "lpg.controller.",
               "text_to_vision.": "lpg.text_to_vision.", "backbone.": prefix}
    for name, value in state.items():
        theirs = next(t for t in renames if name.startswith(t))
        assert torch.equal(ours[renames[theirs] + name.removeprefix(theirs)], value), name

    m = loaded.manifest
    assert m.license == LICENSE and m.lpg == "shared"
    assert m.class_keys == [c.key for c in default_registry().template_32()]
    assert m.provenance["source_sha256"] == sha256_file(ckpt)
    assert m.provenance["source_file"] == ckpt.name and m.provenance["format"] == "clip-driven-universal"
    p = m.preprocessing
    assert (p.spacing, p.hu_window, p.patch_size, p.overlap, p.threshold) == (
        [1.5] * 3, [-175.0, 250.0], [96] * 3, 0.5, 0.5)

    if not run:
        return
    size = SMALL_INPUT[backbone]
    with torch.no_grad():
        logits = loaded.model(torch.rand(1, 1, *size))
    assert logits.shape == (1, 32, *size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("backbone", ["unet", "swinunetr"])
def test_published_configuration_gives_32_maps_at_96_cubed(backbone):
    shapes = published_shapes(backbone)
    model = build_imported_model(backbone)
    assert sum(p.numel() for p in model.parameters()) == json.loads(
        (REFERENCE / f"published_universal_model_{backbone}_keys.json").read_text())["n_params"]
    assert len(model.state_dict()) == len(shapes)
    # the inverse mapping (used by the benchmark) reproduces the published file's spelling exactly
    assert set(published_layout(model.state_dict(), backbone)) == set(
        as_published(shapes, backbone, module=True, bare_swin=backbone == "swinunetr"))
    model = model.to("meta").eval()  # shapes only: a real 96^3 pass takes about a minute on 2 cores
    with torch.no_grad():
        assert model(torch.empty(1, 1, 96, 96, 96, device="meta")).shape == (1, 32, 96, 96, 96)


def _import_error(tmp_path, state, backbone="unet") -> str:
    ckpt = save_checkpoint(tmp_path / "bad.pth", state)
    with pytest.raises(ModelFileError) as e:
        import_checkpoint(ckpt, backbone, output_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())  # nothing written
    return str(e.value)


def test_renamed_key_is_refused_naming_both_spellings(tmp_path, unet_state):
    state = as_published(unet_state, "unet")
    state["module.GAP.4.weight"] = state.pop("module.GAP.3.weight")
    msg = _import_error(tmp_path, state)
    assert "1 missing: GAP.3.weight" in msg and "1 unexpected: module.GAP.4.weight" in msg


def test_missing_key_is_refused(tmp_path, unet_state):
    state = as_published(unet_state, "unet")
    del state["module.backbone.up_tr64.ops.1.bn1.running_var"]
    assert "missing: backbone.up_tr64.ops.1.bn1.running_var" in _import_error(tmp_path, state)


def test_misshaped_key_is_refused(tmp_path, unet_state):
    state = as_published(unet_state, "unet")
    state["module.text_to_vision.weight"] = torch.zeros(256, 768)
    msg = _import_error(tmp_path, state)
    assert "1 mis-shaped: module.text_to_vision.weight [256, 768] (expected [256, 512])" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_other_backbones_checkpoint_is_refused_with_a_hint(tmp_path, unet_state):
    state = as_published(unet_state, "unet")
    msg = _import_error(tmp_path, state, backbone="swinunetr")
    assert "use --backbone unet" in msg and "missing" in msg and "unexpected" in msg


def test_pickle_with_a_custom_object_is_refused(tmp_path, unet_state):
    ckpt = tmp_path / "evil.pth"
    torch.save({"net": as_published(unet_state, "unet"), "extra": NotATensor()}, ckpt)
    with pytest.raises(ModelFileError, match="refused: not a plain weights file.*NotATensor"):
        import_checkpoint(ckpt, "unet", output_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_state_dict_with_non_tensor_entries_is_refused(tmp_path):
    ckpt = save_checkpoint(tmp_path / "odd.pth", {"module.GAP.3.weight": torch.zeros(1), "module.note": "hi"})
    with pytest.raises(ModelFileError, match="not tensors: module.note"):
        import_checkpoint(ckpt, "unet", output_dir=tmp_path)


def test_unreadable_file_and_bad_digests_are_refused(tmp_path, unet_state):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ModelFileError, match="junk.pth"):
        import_checkpoint(junk, "unet", output_dir=tmp_path)
    with pytest.raises(InputError, match="no such checkpoint"):
        import_checkpoint(tmp_path / "absent.pth", "unet", output_dir=tmp_path)
    with pytest.raises(ModelFileError, match="SHA-256 mismatch"):
        import_checkpoint(junk, "unet", output_dir=tmp_path, sha256="0" * 64)
    with pytest.raises(InputError, match="64 hexadecimal"):
        import_checkpoint(junk, "unet", output_dir=tmp_path, sha256="abc")
    with pytest.raises(InputError, match="unknown backbone"):
        import_checkpoint(junk, "vit", output_dir=tmp_path)


def test_cli_import_then_info_and_models_show_the_license(tmp_path, unet_state, capsys):
    ckpt = save_checkpoint(tmp_path / "clip_driven_universal_unet.pth", as_published(unet_state, "unet"))
    assert cli_main(["import-checkpoint", str(ckpt), "--format", "clip-driven-universal", "--backbone", "unet",
                     "-o", "univ-unet"]) == 0  # into the (test-isolated) user model folder
    assert "univ-unet" in capsys.readouterr().out
    assert cli_main(["info", "univ-unet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["license"] == LICENSE and info["provenance"]["source_sha256"] == sha256_file(ckpt)
    assert cli_main(["models"]) == 0
    assert f"license: {LICENSE}" in capsys.readouterr().out
    # the same name again, and a refused file: one line on stderr, exit code 2
    assert cli_main(["import-checkpoint", str(ckpt), "--backbone", "unet", "-o", "univ-unet"]) == 2
    assert "already exists" in capsys.readouterr().err
    evil = tmp_path / "evil.pth"
    torch.save({"net": {}, "x": NotATensor()}, evil)
    assert cli_main(["import-checkpoint", str(evil), "--backbone", "unet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err


def test_batch_statistics_norm_ignores_running_stats_and_keeps_samples_apart():
    torch.manual_seed(0)
    norm = BatchStatsNorm3d(4)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    norm.running_mean.fill_(100.0)  # must never be read ...
    before = norm.running_var.clone()
    x = torch.randn(2, 4, 5, 6, 7) * 3 + 1
    x[1] *= 10  # two very different windows
    # training: statistics of the whole batch, as a BatchNorm in training mode computes them
    expected = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    assert torch.allclose(norm.train()(x), expected, atol=1e-5)
    # inference: still the input's own statistics (not the running ones), per sample
    norm.eval()
    y = norm(x)
    assert torch.allclose(y[:1], norm(x[:1]), atol=1e-6) and torch.allclose(y[1:], norm(x[1:]), atol=1e-6)
    alone = F.batch_norm(x[:1], None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    assert torch.allclose(y[:1], alone, atol=1e-5)
    assert torch.equal(norm.running_mean, torch.full((4,), 100.0)) and torch.equal(norm.running_var, before)


def test_swin_patch_merging_gathers_in_the_reference_order():
    # Tag every voxel with its (depth, height, width) parity, 4*d + 2*h + w, and look at the
    # gathered 8-vector of one 2x2x2 block before norm and projection. The reference gathers
    # offsets 000, 100, 010, 001, 101, 010, 001, 111 (two twice, 110 and 011 never).
    merge = ReferencePatchMerging(dim=1)
    merge.norm, merge.reduction = nn.Identity(), nn.Identity()
    d, h, w = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(4), indexing="ij")
    x = (4 * (d % 2) + 2 * (h % 2) + (w % 2)).float()[None, ..., None]  # (B, D, H, W, C)
    assert merge(x)[0, 1, 0, 1].tolist() == [0, 4, 2, 1, 5, 2, 1, 7]
    model = build_imported_model("swinunetr")
    layers = [getattr(model.backbone.net.swinViT, f"layers{i}")[0].downsample for i in range(1, 5)]
    assert all(type(m) is ReferencePatchMerging for m in layers)


def test_up_stage_equals_transposed_conv_then_concatenation():
    # Our up stage avoids torch's transposed-conv buffer and the concatenated tensor (memory);
    # it must compute what ConvTranspose3d followed by conv(cat[upsampled, skip]) computes.
    torch.manual_seed(0)
    stage = UpStage(in_channels=6, skip_channels=3, out=4).eval()
    x, skip = torch.randn(2, 6, 3, 4, 5), torch.randn(2, 3, 6, 8, 10)
    up = stage.up_conv(x)
    assert torch.allclose(upsample_2x(x, stage.up_conv.weight, stage.up_conv.bias), up, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(stage(x, skip), stage.ops(torch.cat([up, skip], 1)), atol=1e-5)


def test_imported_swin_unetr_predicts_in_a_fresh_process(tmp_path):
    """`universalseg predict` with an imported Swin UNETR, in a process of its own.

    In-process tests cannot show this: once transformers has loaded a text model, torch's meta-device
    context no longer covers `torch.linspace` (transformers patches it while torch first caches its
    list of factory functions), so a network that calls `.item()` while it is built only fails in a
    fresh process, as a user's CLI call is (MONAI 1.6's SwinTransformer does).
    """
    state = random_state(published_shapes("swinunetr"), seed=2)
    ckpt = save_checkpoint(tmp_path / "swin.pth", as_published(state, "swinunetr", module=True, bare_swin=True))
    folder = import_checkpoint(ckpt, "swinunetr", output_dir=tmp_path / "models")
    # A 20 x 20 x 10 crop at 3 mm (body edge: air and tissue) is one 96^3 window at the model's 1.5 mm.
    sample = sitk.ReadImage(str(SAMPLE_DIR / "ct_abdomen.nii.gz"))
    crop = tmp_path / "crop.nii.gz"
    sitk.WriteImage(sample[10:30, 40:60, 50:60], str(crop))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-m", "UniversalSegLib", "predict", str(crop), "-o", str(tmp_path / "out"),
                          "--model", str(folder), "--classes", "liver", "spleen", "--formats", "nifti,stats"],
                         capture_output=True, text=True, encoding="utf-8", env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for key in ("liver", "spleen"):
        mask = sitk.ReadImage(str(tmp_path / "out" / "masks" / f"{key}.nii.gz"))
        assert mask.GetSize() == (20, 20, 10)


def test_loading_builds_on_the_meta_device_where_the_network_allows(tmp_path, monkeypatch):
    """SegResNet and the U-Net are built without a random copy of their weights (meta device)."""
    from UniversalSegLib.store import modelfile

    state = random_state(published_shapes("unet"), seed=3)
    folder = import_checkpoint(save_checkpoint(tmp_path / "unet.pth", as_published(state, "unet")), "unet",
                               output_dir=tmp_path / "models")
    on_meta = []

    def build_and_look(*args):
        model = real_build(*args)
        on_meta.append(all(p.is_meta for p in model.parameters()))
        return model

    real_build = modelfile._build_unallocated
    monkeypatch.setattr(modelfile, "_build_unallocated", build_and_look)
    loaded = modelfile.load_model(folder)
    assert on_meta == [True] and not any(p.is_meta for p in loaded.model.parameters())
