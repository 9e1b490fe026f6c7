"""The Universal Model: shapes, class subsets, the batched dynamic head, LPG sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from UniversalSegLib.model import PerClassLPG, UniversalModel
from UniversalSegLib.model.heads import HEAD_PARAMS, apply_dynamic_heads


def small_model(num_classes: int = 32, embed_dim: int = 384, lpg: str = "per_class") -> UniversalModel:
    torch.manual_seed(0)
    return UniversalModel("segresnet", {"init_filters": 16}, torch.randn(num_classes, embed_dim), lpg=lpg).eval()


@pytest.mark.parametrize("lpg", ["per_class", "shared"])
def test_forward_shapes_and_subset_equals_full(lpg):
    model = small_model(lpg=lpg)
    x = torch.randn(2, 1, 96, 96, 96)
    with torch.no_grad():
        full = model(x)
        subset = model(x, classes=[3, 17, 30])
    assert full.shape == (2, 32, 96, 96, 96)
    assert subset.shape == (2, 3, 96, 96, 96)
    torch.testing.assert_close(subset, full[:, [3, 17, 30]], rtol=0, atol=1e-5)


def naive_heads(feature: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Reference: per sample, per class, three 1x1x1 convs from the 153 numbers (method.md layout)."""
    out = torch.empty(feature.shape[0], params.shape[1], *feature.shape[2:])
    for b in range(feature.shape[0]):
        for n in range(params.shape[1]):
            v = params[b, n]
            w1, w2, w3 = v[:64].reshape(8, 8), v[64:128].reshape(8, 8), v[128:136].reshape(1, 8)
            b1, b2, b3 = v[136:144], v[144:152], v[152:153]
            h = F.relu(F.conv3d(feature[b:b + 1], w1[:, :, None, None, None], b1))
            h = F.relu(F.conv3d(h, w2[:, :, None, None, None], b2))
            out[b, n] = F.conv3d(h, w3[:, :, None, None, None], b3)[0, 0]
    return out


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_batched_head_equals_naive(chunk):
    torch.manual_seed(1)
    feature = torch.randn(3, 8, 10, 11, 12)
    params = torch.randn(3, 7, HEAD_PARAMS)
    torch.testing.assert_close(apply_dynamic_heads(feature, params, chunk), naive_heads(feature, params),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("embed_dim,expected", [(512, 472_217), (384, 406_681)])
def test_lpg_params_per_class(embed_dim, expected):
    lpg = PerClassLPG(5, embed_dim)
    assert PerClassLPG.params_per_class(embed_dim) == expected
    assert sum(p.numel() for p in lpg.parameters()) == 5 * expected


def test_lpg_classes_are_independent():
    """Changing one class's MLP changes only that class's head parameters."""
    lpg = PerClassLPG(4, 16)
    image, text, idx = torch.randn(2, 256), torch.randn(4, 16), torch.arange(4)
    before = lpg(image, text, idx)
    with torch.no_grad():
        lpg.w2[2] += 1.0
    after = lpg(image, text, idx)
    changed = (after - before).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, True, False]


@pytest.mark.parametrize("stored_half", [True, False])
def test_folded_lpg_gives_the_same_head_parameters_in_less_memory(stored_half):
    # Inference folds the text terms and keeps the weights in float16: exact for float16-stored
    # weights (the bundled model), rounding-level otherwise.
    torch.manual_seed(0)
    lpg = PerClassLPG(6, 512, hidden=64)
    if stored_half:
        with torch.no_grad():
            for p in lpg.parameters():
                p.copy_(p.half().float())
    image, text, idx = torch.randn(3, 256), torch.randn(6, 512), torch.tensor([4, 0, 2])
    with torch.no_grad():
        before = lpg(image, text[idx], idx)
        size = sum(p.numel() * p.element_size() for p in lpg.parameters())
        lpg.fold_text(text)
        after = lpg(image, text[idx], idx)
    folded = sum(p.numel() * p.element_size() for p in lpg.parameters()) + lpg.text_part.numel() * 4
    assert folded < 0.3 * size
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if stored_half else {"rtol": 1e-2, "atol": 2e-3}
    torch.testing.assert_close(after, before, **tolerance)
    assert not torch.equal(after, before) or stored_half  # the float32 case really was rounded


def test_shared_controller_param_count():
    model = small_model(lpg="shared", embed_dim=512)
    assert sum(p.numel() for p in model.lpg.controller.parameters()) == 78_489  # method.md
    assert sum(p.numel() for p in model.lpg.text_to_vision.parameters()) == 512 * 256 + 256


def test_add_classes_keeps_old_outputs():
    model = small_model(num_classes=4)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.add_classes(torch.randn(2, 384), init_from=[1, None])
        after = model(x)
    assert after.shape[1] == 6
    torch.testing.assert_close(after[:, :4], before, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.lpg.w1[4], model.lpg.w1[1])


def test_swin_unetr_backbone_taps():
    model = UniversalModel("swinunetr", {"feature_size": 48}, torch.randn(2, 512)).eval()
    assert model.backbone.deep_channels == 768 and model.backbone.voxel_channels == 48
    with torch.no_grad():
        y = model(torch.randn(1, 1, 64, 64, 64))
    assert y.shape == (1, 2, 64, 64, 64)


@pytest.mark.parametrize("grad", [False, True])
def test_segresnet_backbone_equals_monai_decode(grad):
    # Our forward frees skips early and adds in place without autograd; the numbers must be MONAI's.
    from UniversalSegLib.model.backbones import SegResNetBackbone

    torch.manual_seed(0)
    backbone = SegResNetBackbone(init_filters=8).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.set_grad_enabled(grad):
        deep, voxel = backbone(x)
        deep_ref, skips = backbone.net.encode(x)
        expected = backbone.net.decode(deep_ref, list(reversed(skips)))
    assert torch.equal(deep, deep_ref) and torch.allclose(voxel, expected, atol=1e-6)
    if grad:
        voxel.sum().backward()
        assert backbone.net.convInit.conv.weight.grad is not None


def test_lean_monai_skips_extras_and_keeps_them_importable():
    # MONAI eagerly imports optional extras (transformers, sklearn, ...); the `universalseg` command
    # (cli.main installs `_lean_monai`) skips them while MONAI initialises (faster start, less memory)
    # and they stay importable afterwards.
    import subprocess
    import sys

    code = ("import sys; from UniversalSegLib import _lean_monai; _lean_monai.install(); import monai.networks.nets; "
            "print(sorted(m for m in ('transformers', 'sklearn', 'matplotlib', 'scipy.signal', 'scipy.stats') "
            "if m in sys.modules)); "
            "import transformers, matplotlib, scipy.signal; print('importable')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                         check=True).stdout.split("\n")
    assert out[:2] == ["[]", "importable"]


def test_lean_monai_keeps_the_metrics_we_use():
    # scipy.ndimage and scipy.spatial (Dice, Hausdorff, surface Dice) must still work in a lean process
    import subprocess
    import sys

    code = ("from UniversalSegLib import _lean_monai; _lean_monai.install(); import torch; "
            "from monai.metrics import SurfaceDiceMetric, HausdorffDistanceMetric, DiceMetric; "
            "a = torch.zeros(1, 1, 12, 12, 12); a[..., 3:8, 3:8, 3:8] = 1; b = torch.roll(a, 1, 2); "
            "print(float(SurfaceDiceMetric([0.5], include_background=True)(b, a)), "
            "float(HausdorffDistanceMetric(include_background=True)(b, a)), "
            "float(DiceMetric(include_background=True)(b, a)))")
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, encoding="utf-8")
    assert run.returncode == 0, run.stderr[-2000:]
    nsd, hausdorff, dice = (float(v) for v in run.stdout.split())
    assert 0.0 < nsd < 1.0 and hausdorff == 1.0 and dice == pytest.approx(0.8)
