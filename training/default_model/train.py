"""Train the bundled default model from build/bundle.npz (made by prepare.py).

Runs on a GPU (bf16 autocast) or, slowly, on the CPU. All scans stay on the device; each step
draws patches through one `grid_sample` that crops and augments at once (rotation mostly about
the axial axis, anisotropic scaling, never a flip: left/right are different classes), then
intensity augmentation and random thin slabs. The loss supervises only the classes the sampled
source annotates. Checkpoints (our model format + optimiser state, no pickle) every
`checkpoint_every` steps; `--resume` continues from the last one.

    python training/default_model/train.py [--steps N] [--resume] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from UniversalSegLib.inference.sliding_window import cpu_has_native_bf16
from UniversalSegLib.registry import default_registry
from UniversalSegLib.runtime import retain_freed_memory
from UniversalSegLib.store import Manifest, Preprocessing, build_model, load_model, save_model
from UniversalSegLib.train.losses import PartialLabelLoss, exclusion_loss, overlap_matrix

HERE = Path(__file__).resolve().parent


class Bundle:
    """The prepared scans and per-source labels, on the training device."""

    def __init__(self, path: Path, device: torch.device, drop: dict[str, list[str]] | None = None,
                 holdout_top: float = 0.0):
        data = np.load(path)
        drop = drop or {}
        # held-out experiments: the top (superior) fraction of every scan is never seen in training
        keep = {i: int(round(data[f"image_{i}"].shape[2] * (1 - holdout_top))) for i in range(len(json.loads(
            str(data["meta"]))["scans"]))}
        self.meta = json.loads(str(data["meta"]))
        self.class_keys: list[str] = self.meta["class_keys"]
        self.embeddings = torch.from_numpy(data["class_embeddings"]).float()
        self.images = [torch.from_numpy(data[f"image_{i}"][..., :keep[i]].astype(np.float32)).to(device)[None]
                       for i in range(len(self.meta["scans"]))]
        self.structures = [torch.from_numpy(data[f"structure_{i}"][..., :keep[i]].astype(np.float32)).to(device)[None]
                           for i in range(len(self.meta["scans"]))]
        self.sources = []
        for i, src in enumerate(self.meta["sources"]):
            labels = torch.from_numpy(data[f"labels_{i}"][..., :keep[src["scan"]]]).to(device)
            dropped = drop.get(src["name"], [])
            if dropped:  # leave-out experiments: neither the labels nor the structure-map ids are used
                from UniversalSegLib.data.synth import structure_id

                kept = [j for j, k in enumerate(src["classes"]) if k not in dropped]
                labels, src = labels[kept], {**src, "classes": [src["classes"][j] for j in kept]}
                for key in dropped:
                    sid = structure_id(key)
                    if sid is not None:
                        self.structures[src["scan"]][self.structures[src["scan"]] == sid] = 0
            if not src["classes"]:  # every label of this source left out: its scan serves no loss
                continue
            idx = torch.tensor([self.class_keys.index(k) for k in src["classes"]], device=device)
            # foreground voxels per class, for class-balanced crop centres
            fg = [torch.nonzero(labels[c]) for c in range(labels.shape[0])]
            self.sources.append({"name": src["name"], "scan": src["scan"], "labels": labels, "idx": idx, "fg": fg})


def random_rotation(gen: torch.Generator, axial_deg: float = 15.0, tilt_deg: float = 5.0) -> torch.Tensor:
    angles = [(torch.rand(1, generator=gen).item() * 2 - 1) * math.radians(a) for a in (tilt_deg, tilt_deg, axial_deg)]
    rot = torch.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    return rot


def sample_patch(bundle: Bundle, source: dict, patch: int, fg_ratio: float, gen: torch.Generator,
                 num_classes: int, spatial_augment: bool = True) -> dict[str, torch.Tensor]:
    """One patch: image (1,P,P,P), label (K,P,P,P) in model class order, annotated (K,), structure_map (P,P,P).

    With `spatial_augment` the crop is also rotated and scaled (the basic recipe); otherwise the
    generalisation pipeline does the spatial work on the whole batch.
    """
    image = bundle.images[source["scan"]]
    device = image.device
    size = torch.tensor(image.shape[1:], dtype=torch.float32)
    present = [c for c, f in enumerate(source["fg"]) if len(f)]
    if present and torch.rand(1, generator=gen).item() < fg_ratio:
        c = present[torch.randint(len(present), (1,), generator=gen).item()]
        vox = source["fg"][c][torch.randint(len(source["fg"][c]), (1,), generator=gen).item()]
        centre = vox.float().cpu()
    else:
        centre = torch.rand(3, generator=gen) * (size - 1)
    if spatial_augment:
        matrix = random_rotation(gen) * (0.85 + 0.3 * torch.rand(3, generator=gen))  # anisotropic zoom
    else:
        matrix = torch.eye(3)
    offsets = torch.arange(patch, dtype=torch.float32) - (patch - 1) / 2
    grid = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), -1)  # (P,P,P,3) voxel units
    coords = grid.to(device) @ matrix.T.to(device) + centre.to(device)
    img = resample_at(image, coords, "bilinear")
    lab = resample_at(source["labels"], coords, "bilinear") > 0.5
    structures = resample_at(bundle.structures[source["scan"]], coords, "nearest")[0]
    target = torch.zeros((num_classes, patch, patch, patch), device=device)
    target[source["idx"]] = lab.float()
    annotated = torch.zeros(num_classes, dtype=torch.bool, device=device)
    annotated[source["idx"]] = True
    if spatial_augment:
        img = intensity_augment(img, gen)
    return {"image": img, "label": target, "annotated": annotated, "structure_map": structures.to(torch.int16)}


def resample_at(volume: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    """`volume` (C, X, Y, Z) sampled at voxel coordinates `coords` (..., 3), zeros outside; float (C, ...).

    Only the box the coordinates touch is converted and resampled (measured on 2 idle cores: the
    same 0.11 s per 64^3 patch as resampling whole volumes; it bounds the float copy's memory).
    """
    size = volume.shape[1:]
    flat = coords.reshape(-1, 3)
    lo = flat.amin(0).floor().clamp(min=0).long().tolist()
    hi = [min(int(h) + 2, n) for h, n in zip(flat.amax(0).ceil().tolist(), size)]
    lo = [min(a, max(0, n - 2)) for a, n in zip(lo, size)]  # at least two voxels a side: exact normalisation
    box = tuple(slice(a, max(a + 2, b)) for a, b in zip(lo, hi))
    box_size = torch.tensor([s.stop - s.start for s in box], dtype=torch.float32, device=coords.device)
    local = coords - torch.tensor(lo, dtype=torch.float32, device=coords.device)
    norm = (2 * local / (box_size - 1) - 1).flip(-1)[None]  # grid_sample wants (z, y, x) of (X, Y, Z)
    return F.grid_sample(volume[(slice(None), *box)][None].float(), norm, mode=mode, padding_mode="zeros",
                         align_corners=True)[0]


def intensity_augment(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Contrast, brightness, gamma, noise and (sometimes) a thin axial slab surrounded by air."""
    r = lambda: torch.rand(1, generator=gen).item()  # noqa: E731
    img = img * (0.85 + 0.3 * r()) + (r() - 0.5) * 0.2
    img = img.clamp(0, 1) ** (0.7 + 0.8 * r())
    img = img + torch.randn(img.shape, generator=None, device=img.device) * 0.04 * r()
    if r() < 0.15:  # thin series: keep 10-40 axial slices at 3 mm
        depth = img.shape[-1]
        keep = int(10 + r() * 30)
        start = int(r() * max(1, depth - keep))
        img[..., :start] = 0
        img[..., start + keep:] = 0
    return img.clamp(0, 1)


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer, step: int, scheduler, total_steps: int) -> None:
    tensors = {}
    scalars = {"step": step, "scheduler_last_epoch": scheduler.last_epoch, "total_steps": total_steps}
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"{i}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(scalars))


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, device) -> dict:
    tensors = load_file(str(path), device=str(device))
    sd = optimizer.state_dict()
    for name, t in tensors.items():
        i, k = name.split(".", 1)
        sd["state"].setdefault(int(i), {})[k] = t
    optimizer.load_state_dict(sd)
    return json.loads(path.with_suffix(".json").read_text())


def make_manifest(recipe: dict, bundle: Bundle, steps: int) -> Manifest:
    registry = default_registry()
    return Manifest(
        name=recipe["name"], version=recipe["version"], backbone=recipe["backbone"],
        backbone_config=recipe["backbone_config"], classes=[registry.resolve(k) for k in bundle.class_keys],
        lpg="per_class", lpg_hidden=recipe["lpg_hidden"], text_encoder=bundle.meta["text_encoder"],
        prompt_template=bundle.meta["prompt_template"], preprocessing=Preprocessing(**recipe["preprocessing"]),
        license="Apache-2.0 (weights); trained on TotalSegmentator test data (Apache-2.0, CC BY 4.0)",
        description="Demonstration model trained on three real CT scans; NOT a clinical tool.",
        provenance={"recipe": "training/default_model/recipe.yaml", "steps": steps,
                    "training_data": [{"name": s["name"], "classes": s["classes"],
                                       **({"sha256": s["sha256"]} if "sha256" in s else {})}
                                      for s in bundle.meta["sources"]],
                    "created": time.strftime("%Y-%m-%d")})


def initial_weights(model_dir: Path, class_keys: list[str]) -> dict[str, torch.Tensor]:
    """The weights of an existing model with the same classes in the same order (the refine stage)."""
    loaded = load_model(model_dir)
    if loaded.manifest.class_keys != class_keys:
        raise SystemExit(f"--init: {model_dir} has other classes than the recipe")
    return {k: v.float() for k, v in loaded.model.state_dict().items()}


def heads_to_run(annotated: torch.Tensor, exclusion: float, exclusion_classes: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """The class heads one step runs, and the factor that keeps the exclusion loss's scale.

    Without the exclusion loss only the classes some patch annotates (the others get no loss).
    With it, the unannotated heads learn where they are NOT: all of them, or a random
    `exclusion_classes` of them, weighted up by (unannotated / sampled) so the expected loss is
    the same. Each head costs ~30-40 ms per step on 2 float32 CPU cores at batch 2 x 64^3.
    """
    device = annotated.device
    some = annotated.any(0)
    if not exclusion:
        return some.nonzero()[:, 0], 0.0
    others = (~some).nonzero()[:, 0]
    if not exclusion_classes or exclusion_classes >= len(others):
        return torch.arange(len(some), device=device), 1.0
    pick = others[torch.randperm(len(others), generator=gen)[:exclusion_classes].to(device)]
    return torch.cat([some.nonzero()[:, 0], pick]).sort().values, len(others) / exclusion_classes


def generalise_settings(recipe: dict, overrides: list[str]) -> dict:
    """The recipe's `generalise` probabilities with KEY=VALUE overrides (a refinement stage's own)."""
    settings = dict(recipe.get("generalise", {}))
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in settings:
            raise SystemExit(f"error: --generalise-set {item!r}: the recipe's generalise section has no {key!r}")
        settings[key] = float(value)
    return settings


def training_settings(recipe: dict, device: torch.device) -> dict:
    """The recipe's `train` section, with its `cpu` overrides applied when training on the CPU."""
    cfg = {k: v for k, v in recipe["train"].items() if k != "cpu"}
    cfg.setdefault("patch", recipe["preprocessing"]["patch_size"][0])
    if device.type == "cpu":
        cfg.update(recipe["train"].get("cpu", {}))
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--run", default=str(HERE / "runs" / "default"))
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: after 30 steps, shrink the step count (and the LR schedule) to fit")
    ap.add_argument("--augment", choices=["basic", "generalise"], default="generalise",
                    help="basic: crop rotation/scale + intensity; generalise: the SynthSeg-style pipeline (issue 8)")
    ap.add_argument("--drop", nargs="*", default=[], metavar="SOURCE:KEY[,KEY]",
                    help="leave-out experiments: do not supervise these classes of this source")
    ap.add_argument("--holdout-top", type=float, default=0.0,
                    help="hold out this fraction of slices at the top of every scan (evaluate.py --holdout-top)")
    ap.add_argument("--patch", type=int, default=None, help="training patch edge (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    ap.add_argument("--exclusion-classes", type=int, default=None,
                    help="unannotated heads per step for the exclusion loss (0: all; default: the recipe's)")
    ap.add_argument("--generalise-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override the recipe's generalise probabilities, e.g. p_slab=0.5")
    ap.add_argument("--init", default=None, metavar="MODEL_DIR",
                    help="refine: start from this model's weights (same classes), not from scratch")
    args = ap.parse_args()
    recipe = yaml.safe_load((HERE / "recipe.yaml").read_text())
    device = torch.device(args.device)
    if device.type == "cpu":
        retain_freed_memory()  # ~2x faster steps on CPU (no page-fault churn)
    cfg = training_settings(recipe, device)
    overrides = {"patch": args.patch, "batch_size": args.batch_size, "lr": args.lr,
                 "exclusion_classes": args.exclusion_classes}
    cfg.update({k: v for k, v in overrides.items() if v is not None})  # (exclusion_classes 0 means all)
    steps = args.steps or cfg["steps"]
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    drop = {d.split(":")[0]: d.split(":")[1].split(",") for d in args.drop}
    bundle = Bundle(HERE / "build" / "bundle.npz", device, drop, args.holdout_top)
    pipeline = None
    generalise = generalise_settings(recipe, args.generalise_set)
    if args.augment == "generalise":
        from UniversalSegLib.data.synth import build_generalisation_pipeline

        pipeline = build_generalisation_pipeline(spacing_mm=recipe["preprocessing"]["spacing"],
                                                 class_keys=bundle.class_keys, seed=cfg["seed"],
                                                 **generalise)
    manifest = make_manifest(recipe, bundle, steps)
    manifest.provenance.update({"augment": args.augment, "dropped_labels": drop, "holdout_top": args.holdout_top,
                                "exclusion_classes": int(cfg.get("exclusion_classes", 0))})
    if args.augment == "generalise":
        manifest.provenance["generalise"] = generalise
    model = build_model(manifest, bundle.embeddings).to(device)
    if device.type == "cpu":  # oneDNN's 3D convolutions run ~15% faster on channels-last tensors
        model = model.to(memory_format=torch.channels_last_3d)
    if args.init:
        manifest.provenance["refined_from"] = str(args.init)
        if not args.resume:  # a resumed run has these weights' descendants in its checkpoint
            model.load_state_dict(initial_weights(Path(args.init), bundle.class_keys))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warm = cfg["warmup_steps"]
    total = {"steps": steps}  # mutable: --time-budget may shorten the run

    def schedule(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total["steps"] - warm))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = PartialLabelLoss()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    start = 0
    if args.resume and (run / "last" / "manifest.json").exists():
        model.load_state_dict(load_model(run / "last").model.state_dict())
        state = load_optimizer(run / "optimizer.safetensors", optimizer, device)
        start = state["step"]
        total["steps"] = args.steps or state["total_steps"]  # --steps on resume re-plans the cosine's end
        scheduler.last_epoch = state["scheduler_last_epoch"] - 1
        scheduler.step()
        gen.manual_seed(cfg["seed"] + start)
        print(f"resumed at step {start}")
    log = open(run / "log.csv", "a")
    # bf16 autocast on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX: ~3x faster than float32)
    t0, amp = time.time(), device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    print(f"{device}: patch {cfg['patch']}^3, batch {cfg['batch_size']}, {total['steps']} steps, bf16 {amp}",
          flush=True)
    k = len(bundle.class_keys)
    exclusion = float(cfg.get("exclusion_weight", 0.0))
    exclusion_classes = int(cfg.get("exclusion_classes", 0))
    may_overlap = overlap_matrix(manifest.classes).to(device)
    step = start
    while step < total["steps"]:
        model.train()
        samples = []
        for _ in range(cfg["batch_size"]):
            source = bundle.sources[torch.randint(len(bundle.sources), (1,), generator=gen).item()]
            samples.append(sample_patch(bundle, source, cfg["patch"],
                                        cfg["foreground_ratio"], gen, k, spatial_augment=pipeline is None))
        batch = {key: torch.stack([smp[key] for smp in samples]) for key in samples[0]}
        if pipeline is not None:
            with torch.no_grad():
                batch = pipeline(batch)
        classes, exclusion_scale = heads_to_run(batch["annotated"], exclusion, exclusion_classes, gen)
        image, target, annotated = batch["image"], batch["label"][:, classes], batch["annotated"][:, classes]
        if device.type == "cpu":
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(image, classes)
        loss = loss_fn(logits.float(), target, annotated).total
        if exclusion:
            loss = loss + exclusion * exclusion_scale * exclusion_loss(
                logits, target, annotated, may_overlap[classes][:, classes])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s",
                  flush=True)
            log.write(f"{step},{loss.item():.5f},{time.time() - t0:.1f}\n")
            log.flush()
        step += 1
        if args.time_budget and step == start + 30:
            per_step = (time.time() - t0) / 30
            total["steps"] = min(total["steps"], start + int(args.time_budget / per_step))
            print(f"{per_step:.3f} s/step: training {total['steps']} steps", flush=True)
        if step % cfg["checkpoint_every"] == 0 or step == total["steps"]:
            manifest.provenance["steps"] = step
            save_model(model, manifest, run / "last", overwrite=True)
            save_optimizer(run / "optimizer.safetensors", optimizer, step, scheduler, total["steps"])
    # the shipped copy stores half precision: small enough to bundle
    save_model(model.eval(), manifest, run / recipe["name"], overwrite=True, weights_dtype="float16")
    print(f"finished at step {step} in {time.time() - t0:.0f}s -> {run / recipe['name']}")


if __name__ == "__main__":
    main()
