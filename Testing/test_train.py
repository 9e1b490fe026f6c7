"""Training: masked partial-label loss, schedule, pickle-free checkpoints, exact resume, logs and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support import SyntheticPartialDataset, tiny_model

from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.train.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    flatten_optimizer_state,
    latest_checkpoint,
    unflatten_optimizer_state,
)
from UniversalSegLib.train.config import TrainSettings, load_config, parse_config
from UniversalSegLib.train.loop import Trainer, lr_factor
from UniversalSegLib.train.losses import PartialLabelLoss
from UniversalSegLib.train.validation import score_case

KEYS = ["liver", "spleen", "pancreas"]
PATCH = (16, 16, 16)
# dataset "A" annotates liver and spleen, "B" spleen and pancreas: each leaves one class unlabelled
DATASETS = {"A": [0, 1], "B": [1, 2]}


def batch_of(dataset: SyntheticPartialDataset, indices: list[int]) -> dict:
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def lpg_grads(model) -> dict[str, torch.Tensor]:
    return {n: getattr(model.lpg, n).grad.clone() for n in ("w1", "b1", "w2", "b2")}


# ----------------------------------------------------------------------------------------- loss / masking
def test_loss_masks_unannotated_pairs_exactly():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.6).float()
    annotated = torch.tensor([[True, True, False], [True, False, False]])
    terms = PartialLabelLoss()(logits, target, annotated)
    terms.total.backward()
    g = logits.grad
    assert torch.count_nonzero(g[0, 2]) == 0 and torch.count_nonzero(g[1, 1:]) == 0
    assert torch.count_nonzero(g[0, :2]) > 0 and torch.count_nonzero(g[1, 0]) > 0
    assert terms.supervised.tolist() == [True, True, False] and terms.dice[2] == 0 and terms.bce[2] == 0

    # What an unannotated pair's label says is irrelevant: garbage there changes nothing at all.
    garbage = target.clone()
    garbage[0, 2], garbage[1, 1:] = 1 - garbage[0, 2], 1 - garbage[1, 1:]
    logits2 = logits.detach().clone().requires_grad_(True)
    terms2 = PartialLabelLoss()(logits2, garbage, annotated)
    terms2.total.backward()
    assert torch.equal(terms2.total, terms.total) and torch.equal(logits2.grad, g)


def test_loss_is_a_sum_of_per_class_batch_dice_and_bce():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 6, 6, 6)
    target = (torch.rand(2, 2, 6, 6, 6) > 0.5).float()
    annotated = torch.tensor([[True, True], [True, False]])
    terms = PartialLabelLoss(smooth=1e-5)(logits, target, annotated)
    p = torch.sigmoid(logits)
    # class 0: batch Dice over both samples; class 1: only sample 0
    inter0, den0 = (p[:, 0] * target[:, 0]).sum(), p[:, 0].sum() + target[:, 0].sum()
    inter1, den1 = (p[0, 1] * target[0, 1]).sum(), p[0, 1].sum() + target[0, 1].sum()
    dice = torch.stack([1 - (2 * inter0 + 1e-5) / (den0 + 1e-5), 1 - (2 * inter1 + 1e-5) / (den1 + 1e-5)])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(2)
    bce = torch.stack([bce[:, 0].mean(), bce[0, 1]])
    torch.testing.assert_close(terms.dice, dice)
    torch.testing.assert_close(terms.bce, bce)
    torch.testing.assert_close(terms.total, (dice + bce).sum())


def test_a_class_absent_from_its_annotating_samples_gets_no_dice_push_without_empty_dice():
    """An empty target's Dice pushes every logit of its class down (gradient ~ p / smooth), however
    small p is; `empty_dice=False` leaves that class to the BCE. The class that is present (in a
    sample that does not annotate the other) keeps the same Dice either way."""
    torch.manual_seed(2)
    logits = (torch.randn(2, 2, 6, 6, 6) - 20).requires_grad_()  # a head far below 0, as a dead one
    target = torch.zeros(2, 2, 6, 6, 6)
    target[1, 0, 2:4, 2:4, 2:4] = 1  # class 0 only in sample 1; class 1 nowhere
    target[1, 1, 1:3, 1:3, 1:3] = 1  # class 1 present only where it is not annotated
    annotated = torch.tensor([[True, True], [True, False]])
    grads, dice = {}, {}
    for empty_dice in (True, False):
        terms = PartialLabelLoss(bce_weight=0.0, empty_dice=empty_dice)(logits, target, annotated)
        (grad,) = torch.autograd.grad(terms.total, logits)
        grads[empty_dice], dice[empty_dice] = grad, terms.dice
    assert grads[True][:, 1].abs().sum() > 0  # a push down on class 1, though it is nowhere annotated-and-present
    assert torch.all(grads[True][:, 1] >= 0)
    assert torch.equal(grads[False][:, 1], torch.zeros_like(grads[False][:, 1])) and dice[False][1] == 0
    torch.testing.assert_close(grads[False][:, 0], grads[True][:, 0])
    assert dice[False][0] == dice[True][0] > 0.99


def test_unannotated_class_gets_zero_gradient_through_the_model():
    """Acceptance: a class the sample's dataset does not annotate receives exactly zero gradient
    from that sample; a class it annotates receives a non-zero gradient."""
    model, _ = tiny_model(KEYS, patch_size=PATCH)
    data = SyntheticPartialDataset(DATASETS, len(KEYS), PATCH, length=4)
    loss_fn = PartialLabelLoss()

    def grads(batch) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logits = model(batch["image"])  # every class's head runs; only the loss masks
        loss_fn(logits, batch["label"], batch["annotated"]).total.backward()
        return lpg_grads(model)

    only_a = grads(batch_of(data, [0]))  # a sample of dataset A: pancreas (class 2) is unlabelled
    for name, g in only_a.items():
        assert torch.count_nonzero(g[2]) == 0, f"lpg.{name} of the unannotated class got a gradient"
        assert torch.count_nonzero(g[0]) > 0 and torch.count_nonzero(g[1]) > 0, name

    # In a mixed batch the pancreas gradient comes from the B sample alone: rewriting the A sample's
    # (unannotated) pancreas label leaves every gradient bit-identical.
    mixed = batch_of(data, [0, 1])
    reference = grads(mixed)
    assert torch.count_nonzero(reference["w2"][2]) > 0
    mixed["label"][0, 2] = 1 - mixed["label"][0, 2]
    for name, g in grads(mixed).items():
        assert torch.equal(g, reference[name]), name
    torch.testing.assert_close(grads(batch_of(data, [1]))["w2"][2], reference["w2"][2], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("per_dataset", [True, False])
def test_trainer_step_leaves_unannotated_heads_without_gradient(tmp_path, per_dataset):
    model, manifest = tiny_model(KEYS, patch_size=PATCH)
    data = SyntheticPartialDataset({"A": [0, 1], "C": [1]}, len(KEYS), PATCH, length=4)
    settings = TrainSettings(steps=1, batch_size=2, num_workers=0, accumulate_per_dataset=per_dataset,
                             progress=False)
    trainer = Trainer(model, manifest, data, settings, tmp_path)
    loss, parts = trainer.train_step(batch_of(data, [0, 1]))
    assert set(parts) == {"A", "C"} and np.isfinite(loss)
    g = lpg_grads(model)
    assert all(torch.count_nonzero(t[2]) == 0 for t in g.values())  # nobody annotates pancreas
    assert all(torch.count_nonzero(t[0]) > 0 and torch.count_nonzero(t[1]) > 0 for t in g.values())


def test_per_dataset_accumulation_matches_the_whole_batch_gradient_for_bce(tmp_path):
    """Accumulating one backward per dataset gives the same gradient as one batch (GroupNorm never
    mixes samples), here with the BCE part whose per-class batch mean splits exactly."""
    data = SyntheticPartialDataset({"A": [0, 1], "B": [0, 1]}, 2, PATCH, length=4)
    batch = batch_of(data, [0, 1, 2, 3])
    results = []
    for per_dataset in (True, False):
        model, manifest = tiny_model(KEYS[:2], patch_size=PATCH)
        settings = TrainSettings(steps=1, batch_size=4, num_workers=0, dice_weight=0.0, grad_clip=None,
                                 accumulate_per_dataset=per_dataset, progress=False)
        trainer = Trainer(model, manifest, data, settings, tmp_path / str(per_dataset))
        trainer.train_step(batch)
        assert all(n.startswith("backbone.net.conv_final") for n in trainer.frozen)  # SegResNet's unused conv
        results.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine():
    factors = [lr_factor(s, warmup_steps=4, total_steps=14) for s in range(14)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert lr_factor(14, 4, 14) == pytest.approx(0.0) and lr_factor(14, 4, 14, floor=0.1) == pytest.approx(0.1)
    assert lr_factor(9, 4, 14) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(10, 0, 14, kind="constant") == 1.0


# ----------------------------------------------------------------------------------------- checkpoints
def test_optimizer_state_round_trips_without_pickle():
    model, _ = tiny_model(KEYS, patch_size=PATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    for _ in range(2):
        model(torch.rand(1, 1, *PATCH)).mean().backward()
        opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    json.dumps(meta)  # everything that is not a tensor is plain JSON
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    fresh.load_state_dict(unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)), fresh.state_dict()))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lr 1e-3 and betas as a tuple again
    for pid, entries in a["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, b["state"][pid][name]), (pid, name)


def _settings(**kw) -> TrainSettings:
    base = {"steps": 6, "batch_size": 2, "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 2,
            "keep_checkpoints": 5, "num_workers": 0, "progress": False, "seed": 3}
    return TrainSettings(**{**base, **kw})


def _run(folder: Path, init_seed: int = 0, on_step=None, resume: bool = False, **kw) -> Trainer:
    model, manifest = tiny_model(KEYS, seed=init_seed, patch_size=PATCH)
    data = SyntheticPartialDataset(DATASETS, len(KEYS), PATCH, length=6, seed=5)  # 3 steps per epoch
    trainer = Trainer(model, manifest, data, _settings(**kw), folder, datasets=list(DATASETS), on_step=on_step)
    if resume:
        assert trainer.resume()
    trainer.fit()
    return trainer


def _losses(folder: Path) -> list[tuple[str, str]]:
    with open(folder / "train_log.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


class Killed(Exception):
    pass


def test_killed_run_resumes_with_identical_state(tmp_path):
    """Acceptance: a run killed mid-way resumes from its last checkpoint with the optimiser and
    scheduler state it had, and ends with the weights of an uninterrupted run."""
    reference = _run(tmp_path / "reference")

    def kill_at_5(step: int) -> None:
        if step == 5:  # after step 5's update, before the step-6 checkpoint: step 5 is lost
            raise Killed

    with pytest.raises(Killed):
        _run(tmp_path / "killed", on_step=kill_at_5)
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_00000004"
    assert len(_losses(tmp_path / "killed")) == 5

    model, manifest = tiny_model(KEYS, seed=99, patch_size=PATCH)  # different init: weights must come from disk
    data = SyntheticPartialDataset(DATASETS, len(KEYS), PATCH, length=6, seed=5)
    resumed = Trainer(model, manifest, data, _settings(), tmp_path / "killed", datasets=list(DATASETS))
    assert resumed.resume() and resumed.step == 4 and resumed.epoch == 1

    # identical optimiser state: every tensor equals the uninterrupted run's at step 4
    ref_ckpt = tmp_path / "reference" / "checkpoints" / "step_00000004"
    ref_tensors = load_file(str(ref_ckpt / STATE_TENSORS))
    live, _ = flatten_optimizer_state(resumed.optimizer.state_dict())
    assert live.keys() == {k for k in ref_tensors if k.startswith("optim/")} and live
    for key, value in live.items():
        assert torch.equal(value, ref_tensors[key]), key
    ref_meta = json.loads((ref_ckpt / STATE_JSON).read_text())
    assert resumed.scheduler.last_epoch == ref_meta["scheduler"]["last_epoch"] == 4
    assert resumed.optimizer.param_groups[0]["lr"] == ref_meta["scheduler"]["_last_lr"][0]

    resumed.fit()
    assert resumed.step == 6
    final, expected = resumed.model.state_dict(), reference.model.state_dict()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    # the log reads as one run: the lost step 5 was dropped and redone with the same loss
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "reference")
    assert (tmp_path / "killed" / "model" / "manifest.json").is_file()


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    model, manifest = tiny_model(KEYS, patch_size=PATCH)
    data = SyntheticPartialDataset(DATASETS, len(KEYS), PATCH, length=4)
    trainer = Trainer(model, manifest, data, _settings(steps=1), tmp_path)
    assert trainer.resume() is False and trainer.step == 0


# ----------------------------------------------------------------------------------------- logs, plots, metrics
def test_csv_log_plot_and_validation_scores(tmp_path):
    data = SyntheticPartialDataset(DATASETS, len(KEYS), PATCH, length=4, seed=1)
    val = [data[0], data[1]]
    model, manifest = tiny_model(KEYS, patch_size=PATCH)
    trainer = Trainer(model, manifest, data, _settings(steps=2, val_every=1, checkpoint_every=0), tmp_path,
                      val_cases=val, datasets=list(DATASETS))
    trainer.fit()
    with open(tmp_path / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "time", "loss/A", "loss/B"]
    assert all(float(r["loss"]) > 0 and float(r["lr"]) > 0 for r in rows)
    with open(tmp_path / "validation.csv") as f:
        scores = list(csv.DictReader(f))
    # two validations x (A: liver, spleen + B: spleen, pancreas)
    assert len(scores) == 8 and {(r["dataset"], r["class"]) for r in scores} == {
        ("A", "liver"), ("A", "spleen"), ("B", "spleen"), ("B", "pancreas")}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in scores)
    png = (tmp_path / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()  # the final step is always checkpointed


def test_score_case_dice_and_nsd():
    probs, label = torch.zeros(3, 12, 12, 12), torch.zeros(3, 12, 12, 12)
    label[0, 2:8, 2:8, 2:8] = 1
    probs[0, 2:8, 2:8, 3:9] = 0.9  # shifted by one voxel: Dice 5/6, surface within 2 mm
    label[1, 4:6, 4:6, 4:6] = 1  # missed entirely
    dice, nsd = score_case(probs, label, spacing=(1.5, 1.5, 1.5), tolerance_mm=2.0)
    assert dice[0] == pytest.approx(5 / 6) and nsd[0] == pytest.approx(1.0)
    assert dice[1] == 0.0 and nsd[1] == 0.0
    assert dice[2] == 1.0 and nsd[2] == 1.0  # absent and predicted absent
    _, strict = score_case(probs, label, spacing=(1.5, 1.5, 1.5), tolerance_mm=1.0)
    assert strict[0] < 1.0


# ----------------------------------------------------------------------------------------- config
GOOD = {"name": "m", "model": {"classes": ["liver", "Spleen"]}, "datasets": [{"name": "x"}],
        "preprocessing": {"spacing": [3, 3, 3], "patch_size": [32, 32, 32]}, "train": {"steps": 5}}


def test_config_defaults_and_resolution(tmp_path):
    cfg = parse_config(GOOD, tmp_path)
    assert cfg.model.classes == ["liver", "spleen"]  # names resolved to registry keys
    assert cfg.output == (tmp_path / "runs" / "m").resolve() and cfg.cache_dir == cfg.output / "cache"
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 1e-5 and cfg.train.scheduler == "cosine"
    assert cfg.train.total_steps() == 5 and cfg.preprocessing.hu_window == [-175.0, 250.0]
    epochs = parse_config({**GOOD, "train": {"epochs": 3, "samples_per_epoch": 40, "batch_size": 2}}, tmp_path)
    assert epochs.train.total_steps(world_size=2) == 30
    assert len(cfg.config_hash()) == 64 and cfg.config_hash() != epochs.config_hash()


@pytest.mark.parametrize("change, message", [
    ({"model": {"classes": ["liver", "no_such_organ"]}}, "unknown class 'no_such_organ'"),
    ({"model": {"classes": ["liver", "liver"]}}, "more than once"),
    ({"model": {"classes": ["liver"], "backbone": "resnet9000"}}, "model.backbone: must be one of"),
    ({"train": {"stpes": 5}}, "train.stpes: unknown key"),
    ({"train": {"amp": "fp8"}}, "train.amp: must be one of"),
    ({"train": {"batch_size": 0}}, "train.batch_size: must be a positive integer, got 0"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"preprocessing": {"spacing": [1, 1]}}, "preprocessing.spacing: must be three"),
    ({"preprocessing": {"patch_sise": [1, 1, 1]}}, "preprocessing.patch_sise: unknown key"),
    ({"datasets": []}, "datasets: must be a non-empty list"),
    ({"name": "a/b"}, "without slashes"),
    ({"extra": 1}, "extra: unknown key"),
])
def test_config_errors_are_clear(tmp_path, change, message):
    with pytest.raises(UniversalSegError, match=message):
        parse_config({**GOOD, **change}, tmp_path)


def test_config_files(tmp_path):
    (tmp_path / "c.yaml").write_text("name: m\nmodel: {classes: [liver]}\ndatasets: [{name: x}]\ntrain: {steps: 2}\n")
    cfg = load_config(tmp_path / "c.yaml", train_overrides={"steps": 7}, output=tmp_path / "out")
    assert cfg.train.steps == 7 and cfg.output == tmp_path / "out"
    (tmp_path / "c.json").write_text(json.dumps(GOOD))
    assert load_config(tmp_path / "c.json").name == "m"
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UniversalSegError, match="unreadable config"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(UniversalSegError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_yaml_reads_exponent_floats_as_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `2e-3` as text; users write YAML 1.2/JSON numbers, so it must be a float."""
    (tmp_path / "c.yaml").write_text("name: m\nmodel: {classes: [liver]}\ndatasets: [{name: x}]\n"
                                     "train: {steps: 2, lr: 2e-3, weight_decay: 1E-5, min_lr_ratio: 1.0e-2}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.lr == 2e-3 and cfg.train.weight_decay == 1e-5 and cfg.train.min_lr_ratio == 0.01
    import yaml  # the project's loader leaves PyYAML's own SafeLoader unchanged

    assert yaml.safe_load("a: 2e-3") == {"a": "2e-3"}


def test_config_backbone_with_8_filters_builds_and_trains(tmp_path):
    """SegResNet with init_filters 8 (8 voxel channels) used to end in 'num_channels (8) must be
    divisible by num_groups (16)' from the heads' GroupNorm; it is a valid, smaller network."""
    cfg = parse_config({**GOOD, "model": {"classes": ["liver"], "backbone_config": {"init_filters": 8}}}, tmp_path)
    from UniversalSegLib.model.universal import UniversalModel

    model = UniversalModel("segresnet", cfg.model.backbone_config, torch.randn(1, 16), lpg_hidden=8)
    assert model.voxel_feature_head[0].num_groups == 8 and model.image_feature_head[0].num_groups == 16
    logits = model(torch.randn(2, 1, *PATCH))
    logits.sum().backward()
    assert logits.shape == (2, 1, *PATCH) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model, patch, message", [
    ({"backbone_config": {"init_filters": 4}}, [32, 32, 32],
     r"^config: model.backbone_config: does not build a segresnet \(.*divisible.*\), got \{'init_filters': 4\}"),
    ({"backbone_config": {"init_filter": 8}}, [32, 32, 32], r"^config: model.backbone_config: .*init_filter"),
    ({}, [32, 32, 20],
     r"^config: preprocessing.patch_size: must be divisible by 8 for backbone segresnet, got \[32, 32, 20\]"),
])
def test_config_refuses_an_architecture_that_cannot_build_in_one_line(tmp_path, model, patch, message):
    data = {**GOOD, "model": {"classes": ["liver"], **model},
            "preprocessing": {**GOOD["preprocessing"], "patch_size": patch}}
    with pytest.raises(UniversalSegError, match=message) as info:
        parse_config(data, tmp_path)
    assert "\n" not in str(info.value)


def test_log_shows_the_learning_rate_each_step_used(tmp_path):
    """The `lr` column is the rate the optimiser applied at that step (warm-up starts at lr/warmup),
    not the next step's rate read after the scheduler moved on."""
    data = SyntheticPartialDataset(DATASETS, len(KEYS), PATCH, length=4, seed=1)
    model, manifest = tiny_model(KEYS, patch_size=PATCH)
    settings = _settings(steps=3, lr=1e-3, warmup_steps=4, checkpoint_every=0)
    used = []
    trainer = Trainer(model, manifest, data, settings, tmp_path, datasets=list(DATASETS))
    # the rate AdamW reads when it updates the weights
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    with open(tmp_path / "train_log.csv") as f:
        logged = [float(r["lr"]) for r in csv.DictReader(f)]
    assert used == pytest.approx([1e-3 * lr_factor(s, 4, 3) for s in range(3)])
    assert logged == pytest.approx(used, rel=1e-5)


def test_per_dataset_accumulation_keeps_the_whole_batch_gradient_for_disjoint_datasets(tmp_path):
    """Two datasets annotating different classes: the loss sums over classes, so accumulating one
    backward per dataset must give the one-batch loss and gradient, Dice included. Weighting each
    group by its share of the batch used to halve the gradient (norm 1.64 instead of 3.28)."""
    data = SyntheticPartialDataset({"A": [0], "B": [1]}, 2, PATCH, length=4)
    batch = batch_of(data, [0, 1, 2, 3])
    assert sorted(batch["dataset"]) == ["A", "A", "B", "B"]
    results = []
    for per_dataset in (False, True):
        model, manifest = tiny_model(KEYS[:2], patch_size=PATCH)
        settings = TrainSettings(steps=1, batch_size=4, num_workers=0, grad_clip=None,
                                 accumulate_per_dataset=per_dataset, progress=False)
        trainer = Trainer(model, manifest, data, settings, tmp_path / str(per_dataset))
        loss, _ = trainer.train_step(batch)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss, torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])),
                        grads))
    (loss_one, norm_one, one), (loss_acc, norm_acc, acc) = results
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    assert float(norm_acc) == pytest.approx(float(norm_one), rel=1e-4)
    for a, b in zip(one, acc):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"train": {"lr": "abc"}}, "config: train.lr: must be a positive number, got 'abc'"),
    ({"train": {"steps": 2.5}}, "config: train.steps: must be a positive integer, got 2.5"),
    ({"train": {"progress": "no"}}, "config: train.progress: must be true or false, got 'no'"),
    ({"train": {"grad_clip": -1}}, "config: train.grad_clip: must be a positive number, got -1"),
    ({"train": {"device": "gpu"}}, "config: train.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"train": [1]}, "config: train: must be a mapping, got [1]"),
    ({"model": {"classes": []}}, "config: model.classes: must be a non-empty list of class keys, got []"),
    ({"preprocessing": {"hu_window": [250, -175]}},
     "config: preprocessing.hu_window: must be [low, high] with low < high, got [250, -175]"),
    ({"preprocessing": {"patch_size": [32.0, 32, 32]}},
     "config: preprocessing.patch_size: must be three positive integers, got [32.0, 32, 32]"),
    ({"name": None}, "config: name: must be a non-empty name without slashes, got None"),
])
def test_config_errors_name_the_field_in_one_line(tmp_path, change, message):
    with pytest.raises(UniversalSegError) as info:
        parse_config({**GOOD, **change}, tmp_path)
    assert str(info.value) == message




def test_train_classes_train_only_their_heads_and_leave_the_rest_bit_identical(tmp_path):
    """`train.train_classes`: after real optimiser steps (weight decay on), the backbone, the shared
    feature heads and the other classes' LPG rows are exactly as they were; the named class changed."""
    model, manifest = tiny_model(KEYS, patch_size=PATCH)
    data = SyntheticPartialDataset(DATASETS, len(KEYS), PATCH, length=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(steps=3, batch_size=2, num_workers=0, lr=1e-2, weight_decay=0.1, progress=False,
                             train_classes=["spleen"], exclusion_weight=1.0)
    trainer = Trainer(model, manifest, data, settings, tmp_path)
    for _ in range(3):
        trainer.train_step(batch_of(data, [0, 1]))
    for name, p in model.named_parameters():
        if name.startswith("lpg."):
            assert torch.equal(p[0], before[name][0]) and torch.equal(p[2], before[name][2]), name
            assert not torch.equal(p[1], before[name][1]), name  # spleen's row trained
        else:
            assert torch.equal(p, before[name]), name


def test_a_trained_class_is_pushed_off_the_voxels_of_frozen_annotated_classes(tmp_path):
    """With `train_classes` and the exclusion loss, the frozen classes' labels still claim their voxels:
    pancreas (trained, unannotated here) learns it is not on the liver and spleen (frozen, annotated),
    while the frozen rows get no gradient and no loss of theirs is logged."""
    model, manifest = tiny_model(KEYS, patch_size=PATCH)
    data = SyntheticPartialDataset({"A": [0, 1]}, len(KEYS), PATCH, length=2)
    settings = TrainSettings(steps=1, batch_size=2, num_workers=0, progress=False, train_classes=["pancreas"],
                             exclusion_weight=1.0)
    trainer = Trainer(model, manifest, data, settings, tmp_path)
    loss, parts = trainer.train_step(batch_of(data, [0, 1]))
    pancreas = model.lpg.w2.grad[2]
    assert torch.count_nonzero(pancreas) > 0 and loss > 0
    assert all(torch.count_nonzero(getattr(model.lpg, n).grad[:2]) == 0 for n in ("w1", "b1", "w2", "b2"))
    assert parts == {"A": 0.0}  # liver and spleen are annotated, but they do not train


@pytest.mark.parametrize("where", ["train", "stage"])
def test_config_refuses_train_classes_the_model_lacks(tmp_path, where):
    bad = {"train_classes": ["liver", "heart"]}
    data = {**GOOD, "train": {**GOOD.get("train", {}), **bad}} if where == "train" else \
        {**GOOD, "stages": [{"name": "s", "train": bad}]}
    with pytest.raises(UniversalSegError, match=r"train_classes: 'heart' is not one of the model's classes$"):
        parse_config(data, tmp_path)


@pytest.mark.parametrize("where", ["train", "stage"])
def test_config_refuses_train_classes_with_a_shared_parameter_generator(tmp_path, where):
    """One MLP for all classes (`model.lpg: shared`) cannot train some classes alone: said by the config
    check, before any data is read (the trainer would say it only after preprocessing)."""
    model = {**GOOD["model"], "lpg": "shared"}
    trained = {"train_classes": ["liver"]}
    data = {**GOOD, "model": model, "train": {**GOOD["train"], **trained}} if where == "train" else \
        {**GOOD, "model": model, "stages": [{"name": "s", "train": trained}]}
    with pytest.raises(UniversalSegError, match=r"train_classes: needs a per-class parameter generator "
                                                r"\(model\.lpg: per_class\), not 'shared'$"):
        parse_config(data, tmp_path)
