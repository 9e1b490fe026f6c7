"""Throughput of the domain-randomisation pipeline (UniversalSegLib.data.synth) on a 96^3 sample.

The sample is a 96^3 crop of the bundled abdomen CT at 1.5 mm with its structure map and a multi-hot
label for the paper's 32 template classes. Prints the time of each transform (forced on) and of the
whole pipeline with its default probabilities; "split" rows add `p_split_lumen=1` (the baseline is the
row above them); `--png` also saves a montage of synthesised samples.

    OMP_NUM_THREADS=1 python benchmarks/bench_synth.py --threads 1 --png /tmp/synth.png
    python benchmarks/bench_synth.py --device cuda --batch 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from UniversalSegLib.data import fov
from UniversalSegLib.data import synth as S
from UniversalSegLib.registry import default_registry

SAMPLE = Path(S.__file__).resolve().parents[1] / "resources" / "sample"


def load_sample(size: int = 96, spacing: float = 1.5) -> dict:
    """A (size^3) crop at `spacing` mm around the kidneys of the bundled sample, as a per-sample dict."""
    image = nib.as_closest_canonical(nib.load(SAMPLE / "ct_abdomen.nii.gz"))
    labels = nib.as_closest_canonical(nib.load(SAMPLE / "ct_abdomen_labels_totalsegmentator_v2.nii.gz"))
    factor = float(image.header.get_zooms()[0]) / spacing
    hu = torch.from_numpy(np.asarray(image.dataobj, np.float32))[None, None]
    hu_t = F.interpolate(hu, scale_factor=factor, mode="trilinear")[0, 0]
    lab = torch.from_numpy(np.asarray(labels.dataobj).astype(np.float32))[None, None]
    lab_t = F.interpolate(lab, scale_factor=factor, mode="nearest")[0, 0]
    # as a training cache would: the structure map on the training grid (thresholds on resampled HU)
    sm_t = torch.from_numpy(S.build_structure_map(hu_t.numpy(), lab_t.numpy(), spacing_mm=spacing)).float()
    kidneys = torch.nonzero((sm_t == 2) | (sm_t == 3)).float().mean(0).round().long()
    start = [int(min(max(c - size // 2, 0), n - size)) for c, n in zip(kidneys, sm_t.shape)]
    crop = tuple(slice(s, s + size) for s in start)
    sm_c = sm_t[crop].to(torch.int16)
    keys = [c.key for c in default_registry().template_32()]
    label = torch.stack([(sm_c == S.structure_id(k)).float() if S.structure_id(k) else torch.zeros(sm_c.shape)
                         for k in keys])
    return {"image": fov.hu_to_window(hu_t[crop])[None].contiguous(), "label": label, "structure_map": sm_c,
            "annotated": label.flatten(1).amax(1) > 0}


def timed(fn, data: dict, repeat: int, device: torch.device) -> float:
    fn(data)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def montage(sample: dict, path: str, n: int = 7, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe = S.build_generalisation_pipeline(p_synth=1.0, seed=seed)
    synth = S.SynthesizeFromLabels(p=1.0, seed=seed)
    fig, axes = plt.subplots(2, n + 1, figsize=(2.2 * (n + 1), 4.6))
    views, titles = [sample], ["real"]
    for i in range(n):
        views.append(synth(sample) if i % 2 else pipe(sample))
        p = (synth if i % 2 else pipe.transforms[-2]).last_params[0]  # [-1] is ClipToWindow
        titles.append(("synth " if i % 2 else "pipeline ") + str(p.get("phase", ""))[:8] +
                      (" random" if p.get("random_contrast") else ""))
    for col, (view, title) in enumerate(zip(views, titles)):
        image = view["image"][0].cpu()
        axes[0, col].imshow(image[:, :, image.shape[2] // 2].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[1, col].imshow(image[:, image.shape[1] // 2, :].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[0, col].set_title(title, fontsize=8)
        for ax in axes[:, col]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"montage: {path} (top: axial, bottom: coronal mid slices)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=1, help="samples per call (batched dict when > 1)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--png", default=None, help="save a montage of synthesised samples here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sample = load_sample(args.size)
    data = {k: (v if args.batch == 1 else torch.stack([v] * args.batch)).to(device) for k, v in sample.items()}
    print(f"sample {tuple(sample['image'].shape)}, label {tuple(sample['label'].shape)}, batch {args.batch}, "
          f"device {device}, threads {torch.get_num_threads()}")
    transforms = {
        "RandomDeformation": fov.RandomDeformation(p=1.0, p_elastic=1.0, seed=0),
        "RandomZoom": fov.RandomZoom(p=1.0, seed=0),
        "RandomFOVPad(keep_size)": fov.RandomFOVPad(p=1.0, keep_size=True, seed=0),
        "RandomPartialOrgan": fov.RandomPartialOrgan(p=1.0, seed=0),
        "RandomSlab": fov.RandomSlab(p=1.0, seed=0),
        "SynthesizeFromLabels": S.SynthesizeFromLabels(p=1.0, seed=0),
        "ContrastPhaseAugment": S.ContrastPhaseAugment(p=1.0, seed=0),
        "SynthesizeFromLabels split": S.SynthesizeFromLabels(p=1.0, p_split_lumen=1.0, seed=0),
        "ContrastPhaseAugment split": S.ContrastPhaseAugment(p=1.0, p_split_lumen=1.0, seed=0),
        "pipeline p_synth=0.5": S.build_generalisation_pipeline(p_synth=0.5, seed=0),
        "pipeline p_synth=1.0": S.build_generalisation_pipeline(p_synth=1.0, seed=0),
    }
    for name, transform in transforms.items():
        seconds = timed(transform, data, args.repeat, device)
        print(f"{name:26s} {1000 * seconds:8.1f} ms/call  {args.batch / seconds:7.2f} samples/s")
    if args.png:
        montage(sample, args.png)


if __name__ == "__main__":
    main()
