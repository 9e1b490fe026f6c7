"""`universalseg train CONFIG` end to end on tiny CT files the test writes: two partially labelled
`plain` datasets, a held-out case, SIGKILL mid-run, `--resume`, and the final model file."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from UniversalSegLib.cli import main
from UniversalSegLib.store import load_model

REPO = Path(__file__).resolve().parents[1]
SHAPE = (28, 28, 28)  # x, y, z voxels at 3 mm


def _write_case(folder: Path, case_id: str, seed: int) -> None:
    """A 'CT' with a body and three organs: labels 1 liver, 2 spleen, 3 pancreas (HU 60, 110, 160)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    hu = np.full(SHAPE, -1000.0)
    hu[3:-3, 3:-3, :] = -50 + rng.normal(0, 10, hu[3:-3, 3:-3, :].shape)
    label = np.zeros(SHAPE, np.uint8)
    for value, hu_value in ((1, 60), (2, 110), (3, 160)):
        c = rng.uniform(8, 20, 3)
        r = rng.uniform(3, 5)
        inside = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r * r
        label[inside], hu[inside] = value, hu_value
    for sub, array in (("images", hu.astype(np.int16)), ("labels", label)):
        image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
        image.SetSpacing((3.0, 3.0, 3.0))
        image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(folder / sub / f"{case_id}.nii.gz"))


def write_run(tmp_path: Path, steps: int, checkpoint_every: int, name: str = "cli-tiny") -> Path:
    for i in range(3):
        _write_case(tmp_path / "data_a", f"a{i}", seed=i)
        _write_case(tmp_path / "data_b", f"b{i}", seed=10 + i)
    config = {
        "name": name,
        "output": "run",
        "model": {"classes": ["liver", "spleen", "pancreas"], "backbone": "segresnet", "lpg_hidden": 32,
                  "backbone_config": {"init_filters": 16, "blocks_down": [1, 1], "blocks_up": [1]}},
        "preprocessing": {"spacing": [3.0, 3.0, 3.0], "patch_size": [16, 16, 16]},
        "datasets": [
            # A annotates liver and spleen (its pancreas voxels are unlabelled), B only pancreas
            {"name": "A", "format": "plain", "root": "data_a", "label_map": {"1": "liver", "2": "spleen"},
             "split": {"val": ["a2"]}},
            {"name": "B", "format": "plain", "root": "data_b", "label_map": {"3": "pancreas"},
             "split": {"val": ["b2"]}},
        ],
        "train": {"steps": steps, "batch_size": 2, "lr": 2e-3, "warmup_steps": 2, "samples_per_epoch": 8,
                  "checkpoint_every": checkpoint_every, "val_every": 0, "num_workers": 0, "device": "cpu",
                  "seed": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "UniversalSegLib", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=env, **kw)


def steps_logged(run: Path) -> list[int]:
    with open(run / "train_log.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_cli_train_killed_and_resumed(tmp_path):
    """Acceptance: SIGKILL a real `universalseg train` after its first checkpoint; `--resume`
    continues from the saved step and ends with the weights of an uninterrupted run."""
    config = write_run(tmp_path, steps=24, checkpoint_every=3)
    run = tmp_path / "run"
    proc = cli("train", str(config), "--no-progress")
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.json").is_file():
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be killed: {proc.communicate()[1][-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 240 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    saved = json.loads((run / "checkpoints" / "last.json").read_text())["step"]
    assert 3 <= saved < 24 and not (run / "model").exists()

    resumed = cli("train", str(config), "--resume", "--no-progress")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming at step {saved} of 24" in err
    assert steps_logged(run) == list(range(1, 25))  # each step once: the lost ones were redone
    model = load_model(out.strip().splitlines()[-1])
    prov = model.manifest.provenance
    assert prov["steps"] == 24 and len(prov["config_sha256"]) == 64
    assert {d["name"]: d["classes"] for d in prov["datasets"]} == {"A": ["liver", "spleen"], "B": ["pancreas"]}
    assert model.manifest.class_keys == ["liver", "spleen", "pancreas"]
    with open(run / "validation.csv") as f:  # the held-out cases, each for its annotated classes
        assert {(r["case"], r["class"]) for r in csv.DictReader(f)} == {
            ("a2", "liver"), ("a2", "spleen"), ("b2", "pancreas")}

    # the same config uninterrupted (in this process, single-threaded like the CLI runs above)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(config), "--output", str(tmp_path / "reference"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    expected = load_model(tmp_path / "reference" / "model").model.state_dict()
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("change, message", [
    ({"model": {"classes": ["liver", "kidney_left"]}}, r"no training dataset annotates class\(es\) kidney_left"),
    ({"model": {"classes": ["liverr"]}}, "unknown class 'liverr'"),
    ({"datasets": [{"name": "A", "format": "plain", "root": "nowhere", "label_map": {"1": "liver"}}]},
     "root folder .*nowhere does not exist"),
])
def test_cli_config_errors_exit_2_with_one_line(tmp_path, capsys, change, message):
    config = write_run(tmp_path, steps=1, checkpoint_every=1)
    data = {**yaml.safe_load(config.read_text()), **change}
    if "model" in change:
        data["model"] = {**yaml.safe_load(config.read_text())["model"], **change["model"]}
    config.write_text(yaml.safe_dump(data))
    assert main(["train", str(config), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("universalseg: error:") and re.search(message, lines[-1]), lines
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("trained, refused", [(["liver"], None), (["kidney_left"], "kidney_left")])
def test_only_the_classes_that_train_need_a_dataset(tmp_path, capsys, trained, refused):
    """With `train.train_classes`, a model class no dataset annotates is fine when it does not train
    (a stage that fine-tunes one head on the one source that labels it); a trained one is refused."""
    config = write_run(tmp_path, steps=1, checkpoint_every=1)
    data = yaml.safe_load(config.read_text())
    data["model"]["classes"] = ["liver", "kidney_left"]
    data["train"] = {**data.get("train", {}), "train_classes": trained}
    config.write_text(yaml.safe_dump(data))
    code = main(["train", str(config), "--check"])
    err = capsys.readouterr().err.strip().splitlines()
    if refused is None:
        assert code == 0, err
    else:
        expected = rf"no training dataset annotates class\(es\) {refused}; .* from train\.train_classes$"
        assert code == 2 and re.search(expected, err[-1]), err
