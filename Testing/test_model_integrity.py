"""Model files a user can trust (issue 23): every tampering of a copy of the bundled model is refused
in one line with exit 2 by `info`, `verify` and `predict`, and nothing outside the model folder is
opened (watched with an audit hook, which sees every `open`, plus the safetensors library's own
opens). The tampered copy lies in $UNIVERSALSEG_MODELS under the bundled model's name, so it also
shadows the bundled model: the refusal must not fall back to it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from UniversalSegLib.errors import ModelFileError
from UniversalSegLib.store import BUNDLED_DIR, DEFAULT_MODEL, check_model, load_model, rehash_model
from UniversalSegLib.store.modelfile import stamp

REPO = Path(__file__).resolve().parents[1]
BUNDLED = BUNDLED_DIR / DEFAULT_MODEL
SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"
PASSWD = "/etc/passwd"

# Runs CLI commands in one fresh interpreter, reporting each exit code and stderr, and every file
# opened under the watched paths but outside the model folder.
HELPER = r'''
import contextlib, io, json, os, sys
watch = [os.path.realpath(p) for p in json.loads(sys.argv[1])]
allowed = os.path.realpath(sys.argv[2])
opened = []
def _under(real, root):
    return real == root or real.startswith(root + os.sep)
def hook(event, args):
    if event != "open" or not args or isinstance(args[0], int) or args[0] is None:
        return
    real = os.path.realpath(os.fsdecode(args[0]))
    if not _under(real, allowed) and any(_under(real, w) for w in watch):
        opened.append(real)
sys.addaudithook(hook)
import safetensors
_safe_open = safetensors.safe_open
def watched_safe_open(path, *a, **k):  # the library opens files in Rust, unseen by audit hooks
    hook("open", (path,))
    return _safe_open(path, *a, **k)
safetensors.safe_open = watched_safe_open
from UniversalSegLib.cli import main
results = []
for argv in json.loads(sys.argv[3]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    results.append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
print(json.dumps({"results": results, "opened_outside": opened}))
'''


def run_watched(commands: list[list[str]], model: Path, watch: list[Path], env_models: Path) -> dict:
    env = {**os.environ, "UNIVERSALSEG_MODELS": str(env_models), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", HELPER, json.dumps([str(w) for w in watch]), str(model),
                           json.dumps(commands)], capture_output=True, text=True, encoding="utf-8", env=env,
                                      timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """A copy of the bundled model in a user model folder, and valid copies of its files outside it."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    model = models / DEFAULT_MODEL
    shutil.copytree(BUNDLED, model)
    shutil.copytree(BUNDLED, outside)
    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(models))
    return model, outside


def edit_manifest(model: Path, change, restamp: bool = False) -> None:
    data = json.loads((model / "manifest.json").read_text())
    change(data)
    if restamp:  # what someone who re-stamps a tampered copy (or forges a record) would do
        data = stamp(data)
    (model / "manifest.json").write_text(json.dumps(data, indent=1))


def _swap_liver_spleen(data):
    keys = [c["key"] for c in data["classes"]]
    i, j = keys.index("liver"), keys.index("spleen")
    data["classes"][i], data["classes"][j] = data["classes"][j], data["classes"][i]


def _set(field, value, restamp=False):
    return lambda model, outside: edit_manifest(model, lambda d: d.__setitem__(field, value), restamp)


def _threshold(model, outside):
    edit_manifest(model, lambda d: d["preprocessing"].__setitem__("threshold", 0.1))


def _colour(model, outside):
    edit_manifest(model, lambda d: d["classes"][0].__setitem__("color", [255, 0, 0]))


def _swap(model, outside):
    edit_manifest(model, _swap_liver_spleen)


def _weights_symlink(model, outside):
    (model / "weights.safetensors").unlink()
    (model / "weights.safetensors").symlink_to(outside / "weights.safetensors")


def _manifest_symlink(model, outside):
    (model / "manifest.json").unlink()
    (model / "manifest.json").symlink_to(outside / "manifest.json")


def _replace_weights(model: Path, data: bytes, restamp: bool) -> None:
    (model / "weights.safetensors").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    edit_manifest(model, lambda d: d.__setitem__("weights_sha256", digest), restamp)


def _pickle(restamp):
    def tamper(model, outside):
        tensors = load_file(str(model / "weights.safetensors"))
        path = outside / "state.pt"
        torch.save(tensors, path)
        _replace_weights(model, path.read_bytes(), restamp)
    return tamper


def _header_2_40(model, outside):
    data = (model / "weights.safetensors").read_bytes()
    _replace_weights(model, (1 << 40).to_bytes(8, "little") + data[8:], restamp=True)


def _text_embedding(model, outside):
    tensors = load_file(str(model / "weights.safetensors"))
    tensors["class_embeddings"][0] = tensors["class_embeddings"][1]  # class 0 prompted like class 1
    save_file(tensors, str(model / "weights.safetensors"), metadata={"format": "universalseg-model"})


def _legacy(model, outside):
    edit_manifest(model, lambda d: d.pop("integrity"))


def _forged_field_digest(model, outside):
    def change(d):
        _swap_liver_spleen(d)
        d["integrity"]["fields"]["classes"] = stamp(d)["integrity"]["fields"]["classes"]
    edit_manifest(model, change)


TAMPERINGS = {  # name: (tamper(model, outside), what the one-line refusal must say)
    "swap-liver-spleen": (_swap, "field(s) classes"),
    "weights-file-dotdot": (_set("weights_file", "../../../etc/passwd"), "is not a plain file name"),
    "weights-file-absolute": (_set("weights_file", PASSWD), "is not a plain file name"),
    "weights-file-outside-copy": (lambda m, o: _set("weights_file", str(o / "weights.safetensors"), True)(m, o),
                                  "is not a plain file name"),
    "weights-file-outside-relative": (_set("weights_file", "../../outside/weights.safetensors", True),
                                      "is not a plain file name"),
    "weights-symlink-outside": (_weights_symlink, "symlink that leaves the model folder"),
    "manifest-symlink-outside": (_manifest_symlink, "symlink that leaves the model folder"),
    "pickle-hash-updated": (_pickle(restamp=False), "field(s) weights_sha256"),
    "pickle-restamped": (_pickle(restamp=True), "is not a safetensors file"),
    "header-length-2^40": (_header_2_40, "header length 1099511627776"),
    "text-embedding": (_text_embedding, "weights changed since the model was stamped"),
    "threshold": (_threshold, "field(s) preprocessing"),
    "class-colour": (_colour, "field(s) classes"),
    "legacy-no-record": (_legacy, "universalseg rehash"),
    "forged-field-digest": (_forged_field_digest, "integrity record does not match"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampered_model_refused_in_one_line(layout, tmp_path, name):
    model, outside = layout
    tamper, expected = TAMPERINGS[name]
    tamper(model, outside)
    commands = [["info", DEFAULT_MODEL], ["verify", str(model)],
                ["predict", str(SAMPLE), "-o", str(tmp_path / "out"), "--model", DEFAULT_MODEL]]
    report = run_watched(commands, model, [outside, Path(PASSWD), BUNDLED], model.parent)
    passwd_hash = hashlib.sha256(Path(PASSWD).read_bytes()).hexdigest()[:12]
    for result in report["results"]:
        lines = result["stderr"].strip().splitlines()
        assert result["rc"] == 2, result
        assert len(lines) == 1 and expected in lines[0], result
        assert "Traceback" not in result["stderr"] and passwd_hash not in result["stderr"]
    assert report["opened_outside"] == []
    assert not (tmp_path / "out").exists()


def test_intact_copy_passes_the_same_watch(layout):
    """The harness can pass: an untouched copy is accepted and opens nothing outside its folder."""
    model, outside = layout
    report = run_watched([["info", DEFAULT_MODEL], ["verify", str(model)]], model, [outside, BUNDLED], model.parent)
    assert [r["rc"] for r in report["results"]] == [0, 0], report
    assert report["opened_outside"] == []


def test_the_watch_sees_opens_outside_the_folder(layout):
    """The audit hook and the safetensors wrapper do report opens: reading the outside copy is seen."""
    model, outside = layout
    report = run_watched([["verify", str(outside)]], model, [outside], model.parent)
    assert report["results"][0]["rc"] == 0
    opened = set(report["opened_outside"])
    assert {str(outside / "manifest.json"), str(outside / "weights.safetensors")} <= opened


def test_cli_exit_code_and_one_line_through_python_m(layout):
    model, _ = layout
    _swap(model, None)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for command in ("info", "verify"):
        done = subprocess.run([sys.executable, "-m", "UniversalSegLib", command, DEFAULT_MODEL],
                              capture_output=True, text=True, encoding="utf-8", env=env)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "field(s) classes" in done.stderr, done


def test_legacy_model_rehashed_then_loads_with_the_same_weights(layout, capsys):
    from UniversalSegLib.cli import main

    model, _ = layout
    _legacy(model, None)
    weights = (model / "weights.safetensors").read_bytes()
    with pytest.raises(ModelFileError, match=f"universalseg rehash {model}"):
        check_model(model)
    assert main(["rehash", str(model)]) == 0
    assert "it had no integrity record" in capsys.readouterr().out
    assert main(["verify", str(model)]) == 0
    assert (model / "weights.safetensors").read_bytes() == weights
    assert load_model(model).manifest.integrity_sha256 == check_model(BUNDLED).integrity_sha256


def test_rehash_refuses_changed_weights_unless_told_and_never_stamps_a_pickle(layout):
    model, outside = layout
    _text_embedding(model, outside)
    with pytest.raises(ModelFileError, match="--new-weights"):
        rehash_model(model)
    _, digest, _ = rehash_model(model, new_weights=True)
    assert check_model(model).integrity_sha256 == digest
    _pickle(restamp=False)(model, outside)
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        rehash_model(model, new_weights=True)


def test_record_changes_with_every_field_and_is_stable_across_rewrites(layout):
    """The integrity hash depends on each manifest field (cosmetic ones included) and not on JSON layout."""
    model, _ = layout
    data = json.loads((model / "manifest.json").read_text())
    base = stamp(data)["integrity"]["sha256"]
    assert base == data["integrity"]["sha256"]
    (model / "manifest.json").write_text(json.dumps(data, indent=4, sort_keys=True))  # layout only
    assert check_model(model).integrity_sha256 == base
    for field in [k for k in data if k != "integrity"]:
        changed = json.loads(json.dumps(data))
        changed[field] = "x" if changed[field] != "x" else "y"
        assert stamp(changed)["integrity"]["sha256"] != base, field


def test_duplicate_keys_and_huge_manifests_refused(layout):
    model, _ = layout
    text = (model / "manifest.json").read_text()
    (model / "manifest.json").write_text(text.replace('{\n "format"', '{\n "name": "other",\n "format"', 1))
    with pytest.raises(ModelFileError, match="duplicate key 'name'"):
        check_model(model)


def test_models_list_shows_refused_model_with_reason(layout):
    model, _ = layout
    _threshold(model, None)
    env = {**os.environ, "PYTHONPATH": str(REPO), "UNIVERSALSEG_MODELS": str(model.parent)}
    done = subprocess.run([sys.executable, "-m", "UniversalSegLib", "models", "--json"], capture_output=True,
                          text=True, encoding="utf-8", env=env)
    rows = json.loads(done.stdout)
    assert done.returncode == 0
    assert "field(s) preprocessing" in rows[0]["refused"] and rows[0]["path"] == str(model)
    assert rows[1]["path"] == str(BUNDLED) and "shadowed" in rows[1]["refused"]


def _tiny(tmp_path: Path, name: str, encoder, provenance: dict | None = None) -> Path:
    from UniversalSegLib.store import create_model, save_model

    model, manifest = create_model(name, ["liver", "spleen"], backbone_config={"init_filters": 16},
                                   text_encoder=encoder)
    manifest.provenance = provenance or {}
    return save_model(model, manifest, tmp_path / name)


def test_verify_follows_lineage_to_an_installed_parent(tmp_path, monkeypatch, capsys, minilm):
    from UniversalSegLib.cli import main

    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(tmp_path))
    parent = check_model(_tiny(tmp_path, "tiny-parent", minilm))
    record = {"name": "tiny-parent", "version": parent.version, "integrity_sha256": parent.integrity_sha256,
              "weights_sha256": parent.weights_sha256}
    child = _tiny(tmp_path, "tiny-child", minilm, {"extended_from": record, "source_file": "x.pth",
                                                   "source_sha256": "ab" * 32,
                                                   "datasets": [{"name": "d1", "sha256": "cd" * 32}]})
    assert main(["verify", "tiny-child"]) == 0
    out = capsys.readouterr().out
    assert "parent tiny-parent: ok" in out and "sha256 " + "ab" * 32 in out and "d1: sha256 " + "cd" * 32 in out
    assert main(["info", str(child)]) == 0
    lineage = json.loads(capsys.readouterr().out)["lineage"]
    assert lineage["parents"][0]["integrity_sha256"] == parent.integrity_sha256
    edit_manifest(tmp_path / "tiny-parent", lambda d: d.__setitem__("description", "retrained"), restamp=True)
    assert main(["verify", "tiny-child"]) == 1
    assert "parent tiny-parent: differs" in capsys.readouterr().out


def test_verify_follows_a_refined_from_parent_and_skips_an_earlier_state_of_the_same_release(
        tmp_path, monkeypatch, capsys, minilm):
    """`refined_from` (a training stage's starting model) is a parent like `extended_from`; a stage that
    names no version refines under its parent's name and version, and that record is not compared with
    the installed release of that name (it would always "differ")."""
    from UniversalSegLib.cli import main

    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(tmp_path))
    parent = check_model(_tiny(tmp_path, "tiny-base", minilm))
    record = {"name": "tiny-base", "version": parent.version, "integrity_sha256": parent.integrity_sha256,
              "weights_sha256": parent.weights_sha256}
    _tiny(tmp_path, "tiny-refined", minilm, {"refined_from": record})
    assert main(["verify", "tiny-refined"]) == 0
    assert "parent tiny-base: ok" in capsys.readouterr().out
    # a run's model outside the model folder, and the same release installed (`train.export`)
    earlier = {**record, "name": "tiny-same", "integrity_sha256": "ef" * 32, "weights_sha256": "ef" * 32}
    (tmp_path / "run").mkdir()
    run_model = _tiny(tmp_path / "run", "tiny-same", minilm, {"refined_from": earlier})  # its parent's name, version
    shutil.copytree(run_model, tmp_path / "tiny-same")
    assert main(["verify", str(run_model)]) == 0
    assert "parent tiny-same: not installed: an earlier state of this release" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# The Slicer module's model list, against the stand-in in Testing/slicer_stub (as test_slicer_module.py)
# --------------------------------------------------------------------------------------------------


def test_slicer_model_list_greys_out_refused_models_with_the_reason(layout, tmp_path):
    """The real `models --json` of a tampered copy shadowing the bundled model feeds the module's list:
    both are listed, greyed out, with the backend's reason; nothing is selected, no traceback."""
    model, _ = layout
    _threshold(model, None)
    env = {**os.environ, "PYTHONPATH": str(REPO), "UNIVERSALSEG_MODELS": str(model.parent)}
    listed = subprocess.run([sys.executable, "-m", "UniversalSegLib", "models", "--json"], capture_output=True,
                            text=True, encoding="utf-8", env=env)
    assert listed.returncode == 0, listed.stderr
    (tmp_path / "models.json").write_text(listed.stdout)
    stub = [REPO / "Testing" / "slicer_stub", REPO / "UniversalSeg", REPO / "Testing", REPO]
    code = "import test_model_integrity as t; t._scenario_refused_models()"
    (tmp_path / "slicer-temp").mkdir()
    stub_env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, stub)), "TEST_TMP": str(tmp_path),
                "SLICER_STUB_TEMP": str(tmp_path / "slicer-temp"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          cwd=str(tmp_path), env=stub_env, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _scenario_refused_models():
    import qt
    import test_slicer_module as t

    rows = json.loads((Path(os.environ["TEST_TMP"]) / "models.json").read_text())
    runner = t.fake_runner(models=lambda a, e: t.FakeProcess([t.json_lines(rows)]))
    _, widget = t._make_widget(runner, t.FakeInstaller())
    selector = widget.ui.modelSelector
    assert selector.count == 2
    for i in range(2):
        assert not selector.isItemEnabled(i) and "refused" in selector.itemText(i)
    assert "field(s) preprocessing" in selector.itemData(0, qt.Qt.ToolTipRole)
    assert "shadowed" in selector.itemData(1, qt.Qt.ToolTipRole)
    assert widget.currentModel() is None and "2 refused" in widget.ui.modelInfoLabel.text
    # an intact model beside them is the one selected
    rows.append({"name": "demo", "version": "0.1.0", "classes": 4, "backbone": "segresnet", "license": "x",
                 "path": "/models/demo"})
    widget.refreshModels()
    assert selector.count == 3 and selector.isItemEnabled(2) and widget.currentModel() == "demo"


def test_training_data_hash_follows_file_contents(tmp_path):
    """The `train` command records one SHA-256 per dataset over its files' contents."""
    from types import SimpleNamespace

    from UniversalSegLib.data.spec import Case, DatasetSpec, MaskSource
    from UniversalSegLib.train.config import TrainSettings
    from UniversalSegLib.train.run import provenance

    files = {name: tmp_path / name for name in ("ct.nii.gz", "liver.nii.gz")}
    for i, path in enumerate(files.values()):
        path.write_bytes(bytes([i]) * 100)
    spec = DatasetSpec("d1", [Case(files["ct.nii.gz"], [MaskSource(files["liver.nii.gz"], "liver")], "c1")], ["liver"])
    config = SimpleNamespace(name="m", config_hash=lambda: "0" * 64, train=TrainSettings())
    recorded = provenance(config, [spec])["datasets"][0]["sha256"]
    assert recorded == spec.content_sha256() and len(recorded) == 64
    files["liver.nii.gz"].write_bytes(b"\x01" * 99 + b"\x02")
    assert spec.content_sha256() != recorded
