"""The bundled model's recipe (training/default_model/recipe.yaml) is a `universalseg train` config: it
validates, and a short run of its stages through the CLI on the real scans gives a loadable model.
Also the pieces the recipe added to the product trainer: the `stack` dataset format, the exclusion
loss's heads, stages and `universalseg average`, and their one-line config errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from UniversalSegLib.cli import main as cli
from UniversalSegLib.config_file import read_config_file
from UniversalSegLib.data.stacking import fit_plane, lowest_slice_above, stack_above
from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.train.config import parse_config

RECIPE = Path(__file__).resolve().parents[1] / "training" / "default_model" / "recipe.yaml"


def _recipe() -> dict:
    return read_config_file(RECIPE)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One preprocessing cache for this file's runs (each test fills what it lacks)."""
    return tmp_path_factory.mktemp("recipe_cache")


def _small(recipe: dict, tmp_path: Path, stages: list[str], cache: Path) -> dict:
    """The recipe with small overrides: 6 mm voxels, 32^3 patches, a few of its stages, no workers."""
    small = dict(recipe, output=str(tmp_path / "run"))
    small["preprocessing"] = {**recipe["preprocessing"], "spacing": [6.0, 6.0, 6.0], "patch_size": [32, 32, 32]}
    small["datasets"] = [{**d, "root": str((RECIPE.parent / d["root"]).resolve())} if "root" in d else d
                         for d in recipe["datasets"]]
    tiny = {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0, "progress": False}
    small["train"] = {**recipe["train"], "cache_dir": str(cache)}
    small["train"] = {**small["train"], **tiny, "cpu": {**recipe["train"]["cpu"], **tiny}}
    small["stages"] = [{**s, "train": {**s["train"], **tiny}} if "train" in s else s
                       for s in recipe["stages"] if s["name"] in stages]
    return small


def test_the_recipe_is_a_valid_train_config(capsys):
    assert cli(["train", str(RECIPE), "--check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dataset chest-over-abdomen (stack): 1 training" in out
    for line in ("stage 1: 2146 steps, lr 0.0003, batch 2, patch [64, 64, 64], augment basic, exclusion 0",
                 "stage 2f: 280 steps, lr 3e-05", "stage 0.4.1: average with 0.3 x stage 2d",
                 "stage 2p: 300 steps, lr 0.001"):
        assert line in out
    config = parse_config(_recipe(), RECIPE.parent)
    gpu = config.settings("cuda", config.stages[0])
    assert (gpu.patch_size, gpu.batch_size, gpu.warmup_steps) == ([96, 96, 96], 4, 200)  # stage 1 ran on an H100
    assert config.stages[3].generalise.p_slab == 0.5 and config.settings("cpu", config.stages[5]).exclusion_classes == 0


def test_a_short_run_of_the_recipe_gives_a_loadable_model(tmp_path, cache, capsys):
    """Stages 1 (basic), 2d (generalise, with the chest-over-abdomen composite, 12 sampled exclusion
    heads), 2f (all heads), the 0.4.1 average and 2p (the portal vein's head alone), one step each on
    the real scans."""
    import yaml

    from UniversalSegLib.store import load_model

    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(_small(_recipe(), tmp_path, ["1", "2d", "2f", "0.4.1", "2p"], cache)))
    assert cli(["train", str(config), "--steps", "1", "--device", "cpu", "--no-progress"]) == 0
    run = tmp_path / "run"
    for stage in ("1", "2d", "2f"):
        with open(run / "stages" / stage / "train_log.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1 and math.isfinite(float(rows[0]["loss"])), stage
    model = load_model(run / "model")
    assert model.manifest.version == "0.5.0" and len(model.manifest.class_keys) == 46
    stages = model.manifest.provenance["stages"]
    assert [s["stage"] for s in stages] == ["1", "2d", "2f", "0.4.1", "2p"]
    assert stages[-1]["datasets"] == ["abdomen-gi-vessels-bones"] and stages[-1]["train_classes"] == [
        "portal_vein_and_splenic_vein"] and stages[-1]["dice_on_empty"] is False
    # the sources behind the starting weights stay on record though 2p trained on one
    assert [d["name"] for d in model.manifest.provenance["datasets"]] == [d["name"] for d in _recipe()["datasets"]]
    # 2p changes the portal vein's parameter generator and nothing else
    vein = model.manifest.class_keys.index("portal_vein_and_splenic_vein")
    before = load_model(run / "stages" / "0.4.1" / "model").model.state_dict()
    for name, value in model.model.state_dict().items():
        if name.startswith("lpg."):
            others = [i for i in range(46) if i != vein]
            assert torch.equal(value[others], before[name][others]), name
        else:
            assert torch.equal(value, before[name]), name
    assert stages[1]["datasets"][-1] == "chest-over-abdomen" and stages[0]["augment"] == "basic"
    with torch.no_grad():
        logits = model.model(torch.zeros(1, 1, 32, 32, 32), torch.tensor([0, 45]))
    assert logits.shape == (1, 2, 32, 32, 32) and torch.isfinite(logits).all()
    # the composite: C's chest on A's abdomen, the heart annotated (present above, absent below)
    from UniversalSegLib.data.cache import CachedCase

    entry = next((cache / "chest-over-abdomen").glob("*/meta.json")).parent
    case = CachedCase.open(entry)
    heart = case.annotated_labels()[case.channels.index(45)]
    slices = np.flatnonzero(heart.any(axis=(0, 1)))
    assert case.has_structure and slices.size and slices[0] > 0


def test_a_stage_starts_from_a_model_folder_and_resume_skips_finished_stages(tmp_path, cache, capsys):
    """Stage 2d refines the bundled model (`init`), as it refined v0.3.0; a resumed run keeps it."""
    import yaml

    from UniversalSegLib.store import load_model

    bundled = load_model()
    small = _small(_recipe(), tmp_path, ["2d", "2f"], cache)
    small["stages"][0]["init"] = str(bundled.path)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(small))
    assert cli(["train", str(config), "--steps", "1", "--device", "cpu", "--no-progress"]) == 0
    first = tmp_path / "run" / "stages" / "2d" / "model"
    refined = load_model(first)
    b = bundled.manifest  # recorded by hash, as `universalseg info` shows a parent (not by a local path)
    assert refined.manifest.provenance["refined_from"] == {"name": b.name, "version": b.version,
                                                           "weights_sha256": b.weights_sha256,
                                                           "integrity_sha256": b.integrity_sha256}
    from UniversalSegLib.store.lineage import summary
    assert summary(refined.manifest)["parents"] == [
        {"relation": "refined from", "name": b.name, "version": b.version, "integrity_sha256": b.integrity_sha256}]
    history = [s["stage"] for s in b.provenance["stages"]]
    assert [s["stage"] for s in refined.manifest.provenance["stages"]] == [*history, "2d"]  # the history goes on
    assert refined.manifest.version == bundled.manifest.version  # 2d names no version of its own
    stamp = (first / "weights.safetensors").stat().st_mtime_ns
    assert cli(["train", str(config), "--steps", "1", "--device", "cpu", "--no-progress", "--resume"]) == 0
    assert "stage 2d: finished earlier" in capsys.readouterr().err
    assert (first / "weights.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change, message", [
    ({"train": {"exclusion_weight": -1}}, "train.exclusion_weight: must be a number >= 0, got -1"),
    ({"train": {"augment": "strong"}}, "train.augment: must be one of basic, generalise, got 'strong'"),
    ({"train": {"cpu": {"patch_size": [64, 64]}}}, "train.cpu.patch_size: must be three positive integers"),
    ({"train": {"patch_size": [36, 36, 36]}}, "train.patch_size: must be divisible by 8"),
    ({"generalise": {"p_slab": 1.5}}, "generalise.p_slab: must be a number in [0, 1], got 1.5"),
    ({"generalise": {"p_slap": 0.5}}, "generalise.p_slap: unknown key"),
    ({"generalise": {"phase_probs": {"late": 1}}}, "generalise.phase_probs: must be a mapping of native / arterial"),
    ({"stages": [{"name": "1", "generalise": {"phase_probs": {"delayed": 0}}}]},
     "stages[0].generalise.phase_probs: must be a mapping of native / arterial / portal_venous / delayed to weights"),
    ({"stages": [{"name": "1", "train": {"lr": "fast"}}]}, "stages[0].train.lr: must be a positive number"),
    ({"stages": [{"name": "1", "generalise": {"p_fov": -0.1}}]}, "stages[0].generalise.p_fov: must be a number in"),
    ({"stages": [{"name": "1"}, {"name": "1"}]}, "stages[1].name: '1' is used twice"),
    ({"stages": [{"name": "1", "datasets": ["nope"]}]}, "stages[0].datasets: no dataset entry is named 'nope'"),
    ({"stages": [{"name": "1"}, {"name": "m", "average": {"parent": "1", "parent_weight": 0.3}}]},
     "stages[1].average.parent: must name a stage before the previous one, got '1'"),
    ({"stages": [{"name": "1"}, {"name": "2"}, {"name": "m", "average": {"parent": "1", "parent_weight": 2}}]},
     "stages[2].average.parent_weight: must be a number in [0, 1], got 2"),
    ({"stages": [{"name": "1"}, {"name": "2"}, {"name": "m", "train": {"lr": 1e-4},
                                              "average": {"parent": "1", "parent_weight": 0.3}}]},
     "stages[2]: an average stage trains nothing"),
    ({"stages": [{"name": "1", "init": "no/such/model"}]}, "stages[0].init: "),
    ({"model": {"weights_dtype": "int8"}}, "model.weights_dtype: must be one of float32, float16, got 'int8'"),
])
def test_new_config_options_refuse_bad_values_in_one_line(change, message):
    config = {"name": "x", "model": {"classes": ["liver"], "backbone_config": {"init_filters": 8}},
              "datasets": [{"name": "a"}]}
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    with pytest.raises(UniversalSegError) as e:
        parse_config(config)
    assert str(e.value).startswith("config: " + message) and "\n" not in str(e.value)


def test_stack_entries_are_checked_in_one_line(tmp_path):
    from UniversalSegLib.data import load_dataset_specs
    from UniversalSegLib.errors import InputError

    recipe = _recipe()
    entries = [{**d, "root": str((RECIPE.parent / d["root"]).resolve())} if "root" in d else d
               for d in recipe["datasets"]]
    stack = entries[-1]
    for bad, message in (
            ({**stack, "stack": {**stack["stack"], "below": "nope"}}, "stack.below: no earlier dataset entry"),
            ({**stack, "stack": {**stack["stack"], "above_from": {"lowest": "liver", "mm": 48}}},
             "stack.above_from.lowest: 'liver' is not a class dataset 'chest-pa' annotates"),
            ({**stack, "stack": {**stack["stack"], "above_from": {"lowest": "heart", "mm": -1}}},
             "stack.above_from.mm: must be a number of mm"),
            ({k: v for k, v in stack.items() if k != "stack"}, "stack: format stack needs a stack section"),
            ({**entries[0], "name": "x", "hide_structures": ["aorta", "kidney"]}, "hide_structures: kidney has no "
                                                                                  "structure id"),
            ({**entries[0], "name": "x", "structure_ids": "ts"}, "structure_ids: must be labels or totalsegmentator")):
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_dataset_specs([*entries[:-1], bad], RECIPE.parent)


def test_exclusion_heads_are_the_annotated_ones_plus_a_sample_of_the_others():
    from types import SimpleNamespace

    from UniversalSegLib.train.config import TrainSettings
    from UniversalSegLib.train.loop import Trainer

    annotated = torch.zeros(2, 10, dtype=torch.bool)
    annotated[0, [1, 4]] = annotated[1, 7] = True
    trainer = SimpleNamespace(settings=TrainSettings(exclusion_weight=0.0), step=0, dist=SimpleNamespace(rank=0),
                              trained_rows=None, trains=torch.ones(10, dtype=torch.bool))  # every class trains
    classes, scale = Trainer._heads(trainer, annotated, 0)
    assert classes.tolist() == [1, 4, 7] and scale == 0.0
    trainer.settings = TrainSettings(exclusion_weight=5.0, exclusion_classes=3)
    seen = set()
    for step in range(40):
        trainer.step = step
        classes, scale = Trainer._heads(trainer, annotated, 0)
        assert {1, 4, 7} <= set(classes.tolist()) and len(classes) == 6
        assert classes.tolist() == sorted(classes.tolist()) and scale == pytest.approx(7 / 3)
        seen |= set(classes.tolist()) - {1, 4, 7}
    assert seen == {0, 2, 3, 5, 6, 8, 9}  # every unannotated class gets its turn
    trainer.settings = TrainSettings(exclusion_weight=5.0, exclusion_classes=0)  # 0: all heads, unscaled
    every, scale = Trainer._heads(trainer, annotated, 0)
    assert every.tolist() == list(range(10)) and scale == 1.0


def test_fit_plane_crops_around_the_centre_and_pads_symmetrically():
    volume = np.arange(10 * 8 * 3).reshape(10, 8, 3)
    crop = fit_plane(volume, (4, 8), (7.0, 4.0), fill=-1)
    assert np.array_equal(crop, volume[5:9])  # centred on x=7
    edge = fit_plane(volume, (4, 8), (9.5, 4.0), fill=-1)
    assert np.array_equal(edge, volume[6:10])  # held inside the array
    padded = fit_plane(volume, (13, 8), (0.0, 0.0), fill=-1)
    assert padded.shape == (13, 8, 3) and np.array_equal(padded[1:11], volume)
    assert (padded[0] == -1).all() and (padded[11:] == -1).all()


def test_chest_block_starts_above_the_anchor_and_sits_on_top_of_the_abdomen():
    heart = np.zeros((4, 4, 20), bool)
    heart[1:3, 1:3, 5:12] = True
    assert lowest_slice_above(heart, 6.0, 3.0) == 7
    with pytest.raises(ValueError, match="empty"):
        lowest_slice_above(np.zeros_like(heart), 6.0, 3.0)
    below = {"image": np.full((8, 6, 5), 0.5, np.float16), "liver": np.ones((8, 6, 5), bool)}
    above = {"image": np.full((4, 4, 3), 0.9, np.float16), "heart": np.ones((4, 4, 3), bool)}
    out = stack_above(below, above, (2.0, 3.0))
    assert out["image"].shape == (4, 4, 8) and out["image"].dtype == np.float16
    assert (out["image"][..., :5] == np.float16(0.5)).all() and (out["image"][..., 5:] == np.float16(0.9)).all()
    # each side's classes are absent from the other block (that is what the composite annotates)
    assert out["liver"][..., :5].all() and not out["liver"][..., 5:].any()
    assert out["heart"][..., 5:].all() and not out["heart"][..., :5].any()


def test_average_interpolates_weights_and_records_it(tmp_path, minilm):
    """v0.4.1 is 0.7 x stage 2f + 0.3 x stage 2d: each float tensor is the mix, the version and a
    provenance stage say so, and models with other classes are refused (exit code 2, one line)."""
    from UniversalSegLib.store import create_model, load_model, save_model

    config = {"init_filters": 16, "blocks_down": [1, 1], "blocks_up": [1]}
    folders = []
    for seed, keys in ((0, ["liver", "spleen"]), (1, ["liver", "spleen"]), (2, ["liver", "aorta"])):
        torch.manual_seed(seed)
        model, manifest = create_model(f"m{seed}", keys, backbone_config=config, text_encoder=minilm)
        folders.append(str(save_model(model, manifest, tmp_path / f"m{seed}")))
    out = tmp_path / "mixed"
    assert cli(["average", folders[0], folders[1], "--parent-weight", "0.3", "--version", "9.9.9",
                "--out", str(out)]) == 0
    mixed, refined, parent = (load_model(p).model.state_dict() for p in (out, *folders[:2]))
    for key, value in mixed.items():
        if value.is_floating_point():  # stored in float16, like the bundled model
            assert torch.allclose(value, 0.7 * refined[key] + 0.3 * parent[key], atol=2e-3, rtol=2e-3), key
    manifest = load_model(out).manifest
    assert manifest.version == "9.9.9" and manifest.provenance["stages"][-1]["parent_weight"] == 0.3
    parents = [load_model(p).manifest for p in folders[:2]]  # issue 23: lineage by integrity hash
    assert [(a["name"], a["integrity_sha256"], a["weight"]) for a in manifest.provenance["averaged_from"]] == \
        [(m.name, m.integrity_sha256, w) for m, w in zip(parents, (0.7, 0.3))]
    assert cli(["average", folders[0], folders[2], "--parent-weight", "0.3", "--out", str(tmp_path / "no")]) == 2
    assert cli(["average", folders[0], folders[1], "--parent-weight", "1.5", "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("per_dataset", [True, False])
def test_exclusion_loss_trains_the_unannotated_heads_where_other_classes_are(tmp_path, per_dataset):
    """Nobody annotates pancreas: without the exclusion loss its head gets no gradient; with it, it
    learns 'not pancreas' on the liver and spleen voxels, in one pass or one pass per dataset."""
    from support import SyntheticPartialDataset, tiny_model

    from UniversalSegLib.train.config import TrainSettings
    from UniversalSegLib.train.loop import Trainer

    keys, patch = ["liver", "spleen", "pancreas"], (16, 16, 16)
    data = SyntheticPartialDataset({"A": [0, 1], "C": [1]}, len(keys), patch, length=4)
    batch = torch.utils.data.default_collate([data[0], data[1]])
    grads = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        model, manifest = tiny_model(keys, patch_size=patch)
        settings = TrainSettings(steps=1, batch_size=2, num_workers=0, accumulate_per_dataset=per_dataset,
                                 progress=False, exclusion_weight=weight)
        loss, _ = Trainer(model, manifest, data, settings, tmp_path / str(weight)).train_step(batch)
        assert math.isfinite(loss)
        grads[weight] = {n: getattr(model.lpg, n).grad[2].clone() for n in ("w1", "b1", "w2", "b2")}  # its head
    assert all(torch.count_nonzero(g) == 0 for g in grads[0.0].values())
    assert all(torch.count_nonzero(g) > 0 for g in grads[5.0].values())


def test_the_batch_transform_runs_on_each_batch_seeded_by_the_step(tmp_path):
    from support import SyntheticPartialDataset, tiny_model

    from UniversalSegLib.train.config import TrainSettings
    from UniversalSegLib.train.loop import Trainer

    class Recorder:
        def __init__(self):
            self.seeds, self.calls = [], 0

        def set_seed(self, seed, per_worker=True):
            self.seeds.append(seed)

        def __call__(self, batch):
            self.calls += 1
            return {**batch, "image": torch.zeros_like(batch["image"])}

    keys, patch = ["liver", "spleen"], (16, 16, 16)
    data = SyntheticPartialDataset({"A": [0, 1]}, len(keys), patch, length=4)
    model, manifest = tiny_model(keys, patch_size=patch)
    recorder = Recorder()
    trainer = Trainer(model, manifest, data, TrainSettings(steps=2, batch_size=2, num_workers=0, progress=False),
                      tmp_path, batch_transform=recorder)
    trainer.fit()
    assert recorder.calls == 2 and len(set(recorder.seeds)) == 2  # a stream per step: resume draws the same
