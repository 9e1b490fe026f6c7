"""Continual learning (`extend_model`, `universalseg extend`) on crops of the real angiogram.

A tiny random base model keeps every run to seconds; what is checked is the mechanics the issue
promises (old weights bit-identical where frozen, base file untouched, nothing written on cancel,
pseudo-labels computed once per case, lineage and report contents), not segmentation quality.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import shared

from UniversalSegLib.continual import ExtensionCancelled, extend_model
from UniversalSegLib.continual import pseudo as pseudo_module
from UniversalSegLib.continual.classes import embed_new_classes, make_new_classes, most_similar
from UniversalSegLib.continual.data import load_extension_data
from UniversalSegLib.continual.extend import _extended_registry, extended_version
from UniversalSegLib.continual.trainer import _sampled_logits
from UniversalSegLib.errors import InputError
from UniversalSegLib.model import UniversalModel
from UniversalSegLib.registry import default_registry
from UniversalSegLib.store import Preprocessing, create_model, load_model, save_model, sha256_file

TINY = {"init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}
OLD = ["aorta", "heart", "vertebrae_T12", "liver", "spleen"]
NEW = ["aorta_true_lumen", "aorta_false_lumen"]
FAST = dict(warmup_heads_steps=2, steps=2, pool_size=2, batch_size=2, retention_images=(), seed=0)
# (x, y) crop around the aorta at 1.5 mm, and three z ranges: two training cases and one held out.
CROP_XY = (slice(24, 88), slice(30, 94))
CASES = {"c1": slice(10, 50), "c2": slice(50, 90), "c3": slice(90, 130)}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, minilm) -> Path:
    torch.manual_seed(0)
    model, manifest = create_model("tiny-base", OLD, backbone_config=TINY, text_encoder=minilm, lpg_hidden=16,
                                   preprocessing=Preprocessing(spacing=[3.0] * 3, patch_size=[16] * 3))
    return save_model(model, manifest, tmp_path_factory.mktemp("base") / "tiny-base")


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """images/<case>.nii.gz + masks/<class>/<case>.nii.gz; case c1 has only the true-lumen mask."""
    src = shared("ct-thorax-aorta")
    root = tmp_path_factory.mktemp("crops")
    image = sitk.ReadImage(str(src / "ct.nii.gz"))
    masks = {k: sitk.ReadImage(str(src / "masks" / f"{k}.nii.gz")) for k in NEW}
    (root / "images").mkdir()
    for case, z in CASES.items():
        sitk.WriteImage(image[CROP_XY[0], CROP_XY[1], z], str(root / "images" / f"{case}.nii.gz"))
        for key, mask in masks.items():
            if case == "c1" and key == "aorta_false_lumen":
                continue
            (root / "masks" / key).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(mask[CROP_XY[0], CROP_XY[1], z], str(root / "masks" / key / f"{case}.nii.gz"))
    return root


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).model.state_dict()


def test_similar_class_is_picked_by_text_embedding(base_model, minilm):
    manifest = load_model(base_model).manifest
    new = make_new_classes(NEW, manifest)
    emb = embed_new_classes(new, manifest, 384, minilm)
    old = load_model(base_model).model.class_embeddings
    assert [s.key for s in most_similar(emb, old, manifest.class_keys)] == ["aorta", "aorta"]
    assert new[0].name == "Aorta true lumen" and new[0].prompt == "aorta true lumen"


def test_new_class_keys_are_checked(base_model):
    manifest = load_model(base_model).manifest
    with pytest.raises(InputError, match="already in model"):
        make_new_classes(["aorta"], manifest)
    with pytest.raises(InputError, match="parent"):
        make_new_classes([{"key": "aorta_true_lumen", "parents": ["no_such"]}], manifest)
    heart_like = make_new_classes([{"key": "pulmonary_artery", "colour": [1, 2, 3]}], manifest)[0]
    assert heart_like.group == "vessel" and heart_like.color == [1, 2, 3]  # registry entry + override


def test_data_forms_and_long_axis_split(base_model, crops, tmp_path):
    manifest = load_model(base_model).manifest
    registry = _extended_registry(manifest, make_new_classes(NEW, manifest))
    folder = load_extension_data(crops, NEW, manifest, registry, holdout_fraction=0.3)
    pairs = [(crops / "images" / f"{c}.nii.gz",
              {k: crops / "masks" / k / f"{c}.nii.gz" for k in NEW if (crops / "masks" / k / f"{c}.nii.gz").exists()})
             for c in CASES]
    listed = load_extension_data(pairs, NEW, manifest, registry, holdout_fraction=0.3)
    assert [c.case_id for c in folder.train] == ["c1", "c2"] and [c.case_id for c in folder.heldout] == ["c3"]
    assert np.array_equal(folder.train[1].image, listed.train[1].image)
    assert np.array_equal(folder.heldout[0].labels, listed.heldout[0].labels)
    assert folder.train[0].annotated.tolist() == [True, False]  # c1 has only the true-lumen mask
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"name": "lumen", "format": "plain", "root": str(crops), "cases": [
        {"id": c, "image": str(img), "masks": {k: str(m) for k, m in masks.items()}} for c, (img, masks) in
        zip(CASES, pairs)]}]))
    from_spec = load_extension_data(spec, NEW, manifest, registry, holdout_fraction=0.3)
    assert [c.case_id for c in from_spec.heldout] == ["c3"] and "spec" in from_spec.description
    assert np.array_equal(from_spec.heldout[0].labels, folder.heldout[0].labels)

    demo = load_extension_data(shared("ct-thorax-aorta"), NEW, manifest, registry, holdout_fraction=0.3)
    (train,), (held,) = demo.train, demo.heldout
    assert held.labels.any(axis=(1, 2, 3)).all() and train.labels.any(axis=(1, 2, 3)).all()
    total = train.shape[2] + held.shape[2]
    assert held.shape[2] == round(0.3 * total) and held.source.endswith(f"z[0:{held.shape[2]}] of {total}")
    with pytest.raises(InputError, match="no mask found"):
        load_extension_data(crops, ["aorta_true_lumen", "celiac_trunk"], manifest, registry)


def test_head_loss_on_sampled_voxels_equals_full_patch_there():
    """The heads are pointwise, so logits at sampled voxels are the full patch's logits there."""
    torch.manual_seed(0)
    model = UniversalModel("segresnet", TINY, torch.randn(3, 16), lpg_hidden=8).eval()
    x, targets = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 3, 16, 16, 16)
    with torch.no_grad():
        logits, picked = _sampled_logits(model, x, torch.arange(3), targets, 100, torch.Generator().manual_seed(1))
        full = model(x).flatten(2)
    sel = torch.randperm(16**3, generator=torch.Generator().manual_seed(1))[:100]
    assert logits.shape == (2, 3, 100) and torch.allclose(logits, full[:, :, sel], atol=1e-5)
    assert torch.equal(picked, targets.flatten(2)[:, :, sel])


def test_heads_only_keeps_everything_old_bit_identical(base_model, crops, tmp_path):
    sha = sha256_file(base_model / "weights.safetensors")
    before = _state(base_model)
    report = extend_model(base_model, NEW, crops, tmp_path / "ext", train="heads", init="similar", **FAST)
    assert sha256_file(base_model / "weights.safetensors") == sha
    loaded = load_model(report.model_path)
    assert loaded.manifest.class_keys == OLD + NEW
    after = loaded.model.state_dict()
    n = len(OLD)
    for name, old in before.items():
        if name.startswith("lpg.") or name == "class_embeddings":
            assert torch.equal(after[name][:n], old), name
        else:
            assert torch.equal(after[name], old), name
    assert not torch.equal(after["lpg.w2"][n], before["lpg.w2"][OLD.index("aorta")])  # the new head trained
    x = torch.rand(1, 1, 16, 16, 16)
    base = load_model(base_model).model
    with torch.no_grad():
        out = loaded.model(x)
        assert out.shape[1] == n + 2 and torch.equal(out[:, :n], base(x))
    lineage = loaded.manifest.provenance["lineage"][-1]
    assert lineage["parent"]["weights_sha256"] == sha and lineage["classes_added"] == NEW
    parent = load_model(base_model).manifest  # issue 23: `info`/`verify` follow the parent by its integrity hash
    assert lineage["parent"]["integrity_sha256"] == parent.integrity_sha256 != ""
    assert loaded.manifest.provenance["extended_from"]["integrity_sha256"] == parent.integrity_sha256
    assert lineage["init"] == {"aorta_true_lumen": "similar:aorta", "aorta_false_lumen": "similar:aorta"}
    assert lineage["settings"]["train"] == "heads" and lineage["date"] and "folder" in lineage["data"]["description"]
    # an extended model is a new model: its own version, the parent's kept in the lineage record
    assert parent.version == "0.1.0" and loaded.manifest.version == "0.1.0+ext.1"
    assert lineage["parent"]["version"] == loaded.manifest.provenance["extended_from"]["version"] == "0.1.0"


@pytest.mark.parametrize("parent, extensions, version", [
    ("0.1.0", 1, "0.1.0+ext.1"), ("0.1.0+ext.1", 2, "0.1.0+ext.2"), ("2.0+cu", 1, "2.0+cu.ext.1"),
    ("2.0+cu.ext.3", 4, "2.0+cu.ext.4"),
])
def test_extended_version_rule(parent, extensions, version):
    assert extended_version(parent, extensions) == version


def test_heads_decoder_with_pseudo_labels_and_report(base_model, crops, tmp_path, monkeypatch):
    calls = []
    original = pseudo_module.predict_probabilities

    def counting(model, image, *args, **kwargs):
        calls.append(image.shape)
        return original(model, image, *args, **kwargs)

    monkeypatch.setattr(pseudo_module, "predict_probabilities", counting)
    retention = crops / "images" / "c1.nii.gz"
    report = extend_model(base_model, NEW, crops, "ext-hd", train="heads+decoder", init="auto",
                          **{**FAST, "steps": 3, "retention_images": [retention]})
    assert len(calls) == 2 == report.settings["pseudo_label_cache"]["cases"]  # once per training case, 6 patches
    before, after = _state(base_model), _state(report.model_path)
    n = len(OLD)
    encoder = [k for k in before if k.startswith(("backbone.net.convInit", "backbone.net.down_layers"))]
    decoder = [k for k in before if k.startswith("backbone.net.up_layers")]
    assert encoder and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoder + ["image_feature_head.3.weight"])
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    assert all(torch.equal(before[k], after[k][:n]) for k in ("lpg.w1", "lpg.b1", "lpg.w2", "lpg.b2"))

    data = json.loads(report.to_json())
    assert Path(data["model_path"]).parent == Path(os.environ["UNIVERSALSEG_MODELS"])
    assert data["parent"]["weights_sha256_before"] == data["parent"]["weights_sha256_after"]
    assert data["data"]["heldout_cases"][0].endswith("c3.nii.gz")
    held = data["heldout"][0]["new"]
    assert set(held) == set(NEW) and all({"extended_dice", "naive_dice", "warmup_dice", "reference_voxels"} <= set(r)
                                         for r in held.values())
    old = data["retention"][0]["old"]
    assert old and all({"extended_retention", "naive_retention", "base_voxels"} <= set(r) for r in old.values())
    assert "extended_mean_retention" in data["retention_summary"]["c1.nii.gz"]
    for key in NEW:
        sel = data["init_selection"][key]
        assert sel["similar_to"] == "aorta" and sel["chosen"] in ("similar", "fresh")
        assert {"dice", "loss"} <= set(sel["similar"]) and {"dice", "loss"} <= set(sel["fresh"])
    assert data["parameters"]["per_class"] == (256 + 384) * 16 + 16 + 16 * 153 + 153
    assert {"warmup", "warmup_scoring", "pseudo_labels", "train", "naive_baseline", "evaluation", "extension",
            "extension_cpu"} <= set(data["timing_s"])
    assert "held-out Dice aorta_true_lumen" in report.summary()


@pytest.mark.parametrize("when", ["before", "training"])
def test_cancel_leaves_no_model_and_no_temp_dir(base_model, crops, tmp_path, when):
    out_root = tmp_path / "models"
    out_root.mkdir()
    event = threading.Event()
    steps = []

    def on_step(step, loss):
        steps.append(step)
        if len(steps) >= 3:  # 2 warm-up steps, then the first main step
            event.set()

    if when == "before":
        event.set()
    with pytest.raises(ExtensionCancelled):
        extend_model(base_model, NEW, crops, out_root / "ext", train="heads+decoder", init="similar",
                     on_step=on_step, cancel=event, **{**FAST, "steps": 50})
    assert list(out_root.iterdir()) == []
    assert len(steps) == (0 if when == "before" else 3)


def test_cli_extend_round_trip(base_model, crops, tmp_path, monkeypatch, capsys):
    from UniversalSegLib.cli import main

    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(tmp_path / "models"))
    classes_file = tmp_path / "classes.yaml"
    classes_file.write_text("- key: aorta_false_lumen\n  location: {lateral: [-0.5, 0.5]}\n")
    args = ["extend", "--model", str(base_model), "--data", str(crops), "--new-class", "aorta_true_lumen:True lumen",
            "--classes-file", str(classes_file), "-o", "ext-cli", "--group", "vessel", "--parent", "aorta",
            "--train", "heads", "--steps", "2", "--warmup-steps", "2", "--retention-image", "none",
            "--progress-json", "--report", str(tmp_path / "report.json")]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any("progress" in d and "message" in d for d in lines) and any({"loss", "step"} <= set(d) for d in lines)
    final = lines[-1]
    assert final["done"] is True and Path(final["model"]) == tmp_path / "models" / "ext-cli"
    assert json.loads((tmp_path / "report.json").read_text()) == final["report"]
    assert main(["classes", "--model", "ext-cli", "--json"]) == 0
    listed = {c["key"]: c for c in json.loads(capsys.readouterr().out)}
    assert list(listed) == OLD + NEW[::-1] and listed["aorta_true_lumen"]["name"] == "True lumen"
    assert listed["aorta_false_lumen"]["group"] == "vessel" and listed["aorta_false_lumen"]["parents"] == ["aorta"]
    stored = {c.key: c.location for c in load_model(final["model"]).manifest.classes}  # in the model's own manifest
    assert stored["aorta_true_lumen"] == {"trunk": True}  # inside the aorta, which is trunk-only
    assert stored["aorta_false_lumen"] == {"trunk": True, "lateral": [-0.5, 0.5]}
    assert final["report"]["new_classes"][0]["location"] == stored["aorta_false_lumen"]
    assert main(args) == 2  # the name is taken: one-line error, JSON failure line for the wizard
    captured = capsys.readouterr()
    assert "already exists" in captured.err and json.loads(captured.out.splitlines()[-1])["done"] is False


def test_extended_model_runs_in_predict(base_model, crops, tmp_path):
    from UniversalSegLib.inference.predict import predict

    report = extend_model(base_model, NEW, crops, tmp_path / "ext", train="heads", init="fresh", **FAST)
    result = predict(crops / "images" / "c3.nii.gz", model=report.model_path, device="cpu")
    assert result.keys == OLD + NEW
    assert result["aorta_true_lumen"].mask.shape == sitk.GetArrayViewFromImage(result.reference).shape


def _extend_args(*extra: str) -> list[str]:
    return ["extend", "--model", "m", "--data", "d", "-o", "out", *extra]


def _cli_classes(manifest, *extra: str) -> list:
    from UniversalSegLib.cli import build_parser
    from UniversalSegLib.continual.command import new_class_specs

    return make_new_classes(new_class_specs(build_parser().parse_args(_extend_args(*extra))), manifest)


CLASSES_FILE = [
    {"key": "aorta_true_lumen", "name": "True lumen", "prompt": "true lumen of the aorta", "group": "vessel",
     "parents": ["aorta"], "colour": [10, 20, 30], "synonyms": ["TL"]},
    {"key": "aorta_false_lumen", "color": "200, 30, 30", "parents": "aorta_true_lumen", "group": "tumour"},
    "pulmonary_artery",  # a bare key: the registry's entry, then the command-wide defaults
]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_cli_classes_file_gives_each_class_its_own_fields(base_model, tmp_path, suffix):
    import yaml

    manifest = load_model(base_model).manifest
    path = tmp_path / f"classes{suffix}"
    path.write_text(json.dumps(CLASSES_FILE) if suffix == ".json" else yaml.safe_dump({"classes": CLASSES_FILE}))
    made = _cli_classes(manifest, "--classes-file", str(path), "--new-class", "aortic_wall:Aortic wall",
                        "--group", "other", "--parent", "heart", "--synonym", "shared")
    fields = {c.key: (c.name, c.prompt, c.group, c.parents, c.color, c.synonyms) for c in made}
    assert list(fields) == ["aorta_true_lumen", "aorta_false_lumen", "pulmonary_artery", "aortic_wall"]
    assert fields["aorta_true_lumen"] == ("True lumen", "true lumen of the aorta", "vessel", ["aorta"],
                                          [10, 20, 30], ["TL"])
    assert fields["aorta_false_lumen"] == ("Aorta false lumen", "aorta false lumen", "tumour", ["aorta_true_lumen"],
                                           [200, 30, 30], ["shared"])
    registry = default_registry()["pulmonary_artery"]
    assert fields["pulmonary_artery"] == (registry.name, registry.prompt, "other", ["heart"], registry.color,
                                          ["shared"])
    assert fields["aortic_wall"][:4] == ("Aortic wall", "aortic wall", "other", ["heart"])


@pytest.mark.parametrize("content, extra, fragment", [
    (None, (), "give the classes to add"),
    ("missing", (), "cannot read classes file"),
    ("[{key: a", (), "cannot parse classes file"),
    ({"a": 1}, (), "expected a non-empty list"),
    (["aorta_true_lumen", 42], (), "entry 2 must be an object"),
    ([{"name": "No key"}], (), "key: missing (required)"),
    ([{"key": "k", "colour": [1, 2, 300]}], (), "colour: must be three whole numbers 0-255, got [1, 2, 300]"),
    ([{"key": "k", "colour": "red"}], (), "colour: must be three whole numbers 0-255, got 'red'"),
    ([{"key": "k", "colour": [1, 2, 3], "color": [3, 2, 1]}], (), "colour or color, not both"),
    ([{"key": "k", "colr": [1, 2, 3]}], (), "colr: unknown key (known: key, name,"),
    ([{"key": "k", "parents": ["no_such"]}], (), "parent(s) no_such"),
    ([{"key": "k", "group": "blob"}], (), "group 'blob'"),
    ([{"key": "k"}], ("--new-class", "k"), "given twice"),
    ([{"key": "liver"}], (), "already in model"),
])
def test_cli_classes_file_errors_are_one_line(base_model, tmp_path, content, extra, fragment):
    manifest = load_model(base_model).manifest
    path = tmp_path / "classes.yaml"
    if isinstance(content, str) and content != "missing":
        path.write_text(content)
    elif content not in (None, "missing"):
        path.write_text(json.dumps(content))
    args = [*extra] if content is None else ["--classes-file", str(path), *extra]
    with pytest.raises(InputError, match=re.escape(fragment)) as error:
        _cli_classes(manifest, *args)
    assert "\n" not in str(error.value)


def test_cli_extend_bad_classes_file_fails_before_training(base_model, tmp_path, capsys):
    from UniversalSegLib.cli import main

    path = tmp_path / "classes.json"
    path.write_text(json.dumps([{"key": "aorta_true_lumen", "parents": ["aorta"], "colour": [0, 0, 256]}]))
    args = ["extend", "--model", str(base_model), "--data", str(tmp_path), "-o", "never", "--progress-json"]
    assert main([*args, "--classes-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "universalseg: error: new class 'aorta_true_lumen': colour: must be three whole numbers 0-255, got [0, 0, 256]"]
    assert json.loads(captured.out.splitlines()[-1]) == {"done": False, "error": captured.err.split("error: ")[1]
                                                         .strip()}
    assert main(args) == 2 and "give the classes to add" in capsys.readouterr().err
    assert not (Path(os.environ["UNIVERSALSEG_MODELS"]) / "never").exists()


# --- where a new class may lie (ClassInfo.location): given, defaulted, stored, used ---------------------


def test_classes_file_location_is_accepted_and_stored(base_model, tmp_path):
    """A classes file's `location` reaches the class as given, over the default of its key."""
    import yaml

    manifest = load_model(base_model).manifest
    path = tmp_path / "classes.yaml"
    path.write_text(yaml.safe_dump([
        {"key": "humerus_left", "group": "bone", "location": {"trunk": False, "lateral": [0.2, 2.5]}},
        {"key": "aortic_wall", "parents": ["aorta"], "location": {"caudal_to": ["heart"]}},
        {"key": "heart_tumour", "location": {"trunk": True}}]))
    made = {c.key: c.location for c in _cli_classes(manifest, "--classes-file", str(path))}
    assert made == {"humerus_left": {"trunk": False, "lateral": [0.2, 2.5]},
                    "aortic_wall": {"trunk": True, "caudal_to": ["heart"]},
                    "heart_tumour": {"trunk": True}}


def test_new_class_location_defaults(base_model):
    """Unknown key: trunk-only only when every parent is; no parent: trunk false. A registry key keeps
    the registry's location (a given field overrides just that field)."""
    from UniversalSegLib.inference.plausibility import Location

    manifest = load_model(base_model).manifest
    made = {c.key: c for c in make_new_classes([
        "deltoid", {"key": "liver_lesion", "parents": ["liver"]},
        {"key": "arm_lesion", "parents": ["liver", "deltoid"]},  # one parent may lie in an arm
        "pulmonary_artery", {"key": "kidney_left", "location": {"trunk": False}}], manifest)}
    assert made["deltoid"].location == {"trunk": False}
    assert made["liver_lesion"].location == {"trunk": True}
    assert made["arm_lesion"].location == {"trunk": False}
    registry = default_registry()
    assert made["pulmonary_artery"].location == registry["pulmonary_artery"].location
    assert made["kidney_left"].location == {**registry["kidney_left"].location, "trunk": False}
    assert [Location.of(made[k]).trunk for k in ("deltoid", "liver_lesion", "kidney_left")] == [False, True, False]


def test_new_class_location_stands_without_the_registry(base_model, monkeypatch):
    """The stored location is what inference uses later, whatever the registry then says."""
    from UniversalSegLib.inference.plausibility import Location
    from UniversalSegLib.registry import Registry

    deltoid = make_new_classes(["deltoid"], load_model(base_model).manifest)[0]
    monkeypatch.setattr("UniversalSegLib.registry.location.default_registry", lambda: Registry([]))
    assert Location.of(deltoid).trunk is False


@pytest.mark.parametrize("location, fragment", [
    ({"trunk": "yes"}, "location.trunk: must be true or false, got 'yes'"),
    ({"lateral": [0.5, -0.5]}, "location.lateral: must be two numbers [lo, hi], lo <= hi"),
    ({"lateral": [0.5]}, "location.lateral: must be two numbers"),
    ({"lateral": ["a", 1]}, "location.lateral: must be two numbers"),
    ({"caudal_to": ["no_such"]}, "location.caudal_to: no_such not among the model's classes"),
    ({"caudal_to": "k"}, "location.caudal_to names the class itself"),
    ({"inside": "arm"}, "location.inside: unknown key (known: trunk, lateral, caudal_to)"),
    ("trunk", "location: must be a mapping, got 'trunk'"),
])
def test_cli_bad_location_is_one_line_and_exit_2(base_model, tmp_path, capsys, location, fragment):
    from UniversalSegLib.cli import main

    path = tmp_path / "classes.json"
    path.write_text(json.dumps([{"key": "k", "location": location}]))
    args = ["extend", "--model", str(base_model), "--data", str(tmp_path), "-o", "never", "--classes-file", str(path),
            "--progress-json"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("universalseg: error: ") and fragment in err[0], err


def test_a_non_trunk_new_class_turns_limb_blanking_off(base_model):
    """An extended model whose new class may lie in a limb: the model sees the arms (no blanking), and
    the limb rule leaves that class alone, while a trunk-only new class still gets both."""
    from UniversalSegLib.inference.plausibility import blank_limbs
    from UniversalSegLib.inference.rules import OutsideLimbs

    manifest = load_model(base_model).manifest
    deltoid, lesion = make_new_classes(["deltoid", {"key": "liver_lesion", "parents": ["liver"]}], manifest)
    calls = []
    reference = sitk.Image(8, 8, 8, sitk.sitkInt16)
    with pytest.MonkeyPatch.context() as m:
        m.setattr("UniversalSegLib.inference.plausibility.limbs_to_blank",
                  lambda ref, trunk=None: calls.append(ref) or np.zeros(sitk.GetArrayViewFromImage(ref).shape, bool))
        assert blank_limbs(reference, [*manifest.classes, deltoid]) == (reference, 0.0) and calls == []
        blank_limbs(reference, [*manifest.classes, lesion])
        assert calls == [reference]
    keys = [*manifest.class_keys, deltoid.key, lesion.key]
    assert not OutsideLimbs().applies_to(deltoid, keys) and OutsideLimbs().applies_to(lesion, keys)


def test_classes_command_checks_a_classes_file_and_lists_every_problem(base_model, tmp_path, capsys):
    """`classes --new-classes` (what the Slicer wizard runs before training): the classes as they would
    be stored, or every problem, one line each; the model's own listing gives each class's location."""
    from UniversalSegLib.cli import main

    path = tmp_path / "classes.json"
    path.write_text(json.dumps([{"key": "deltoid", "location": {"trunk": "x"}}, {"key": "liver"},
                                {"key": "lesion", "parents": ["no_such"]}]))
    args = ["classes", "--model", str(base_model), "--new-classes", str(path)]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"classes": [], "problems": [
        "new class 'deltoid': location.trunk: must be true or false, got 'x'",
        "class 'liver' is already in model 'tiny-base'; choose a new key",
        "class 'lesion': parent(s) no_such are not classes of the model"]}
    assert main(args) == 2 and len(capsys.readouterr().err.strip().splitlines()) == 3
    path.write_text(json.dumps(["deltoid", {"key": "lesion", "parents": ["liver"]}]))
    assert main([*args, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["problems"] == [] and [c["location"] for c in made["classes"]] == [{"trunk": False}, {"trunk": True}]
    assert main(["classes", "--model", str(base_model), "--json"]) == 0
    listed = {c["key"]: c["location"] for c in json.loads(capsys.readouterr().out)}
    assert listed["liver"] == default_registry()["liver"].location
