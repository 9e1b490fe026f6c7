"""Prepare the default model's training data on the CPU: every scan in model space, one multi-hot
label array per source (its annotated classes only), and the classes' text embeddings.

Writes training/default_model/build/bundle.npz, the only input train.py needs (it runs where
SimpleITK and the text encoder are not installed, e.g. the GPU machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml
from stacking import lowest_slice_above, stack_above  # this script's directory (sys.path[0], or the tests' path)

from UniversalSegLib.geometry import array_xyz, normalise_hu, resample_to_spacing, to_ras
from UniversalSegLib.registry import default_registry
from UniversalSegLib.text import embed_prompts, get_text_encoder

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def load_recipe() -> dict:
    return yaml.safe_load((HERE / "recipe.yaml").read_text())


def model_space(path: Path, spacing, interpolator, default_value: float = 0.0) -> sitk.Image:
    return resample_to_spacing(to_ras(sitk.ReadImage(str(path))), spacing, interpolator, default_value)


def structure_map(hu: np.ndarray, source_list: list[dict], root: Path, spacing) -> np.ndarray:
    """A full anatomical label map (TotalSegmentator ids + synth extras) for SynthSeg-style synthesis."""
    from UniversalSegLib.data.synth import build_structure_map, label_map_from_masks

    ts_map = None
    masks: dict[str, np.ndarray] = {}
    for source in source_list:
        if "label_map" in source:
            ts_map = array_xyz(model_space(root / source["label_map"], spacing, sitk.sitkNearestNeighbor))
        for key, rel in source.get("masks", {}).items():
            masks[key] = array_xyz(model_space(root / rel, spacing, sitk.sitkNearestNeighbor)) > 0
    labels = ts_map if ts_map is not None else label_map_from_masks(masks)
    return build_structure_map(hu, labels, spacing_mm=spacing).astype(np.int16)


def source_labels(source: dict, root: Path, spacing, shape) -> dict[str, np.ndarray]:
    """Binary masks (x, y, z) in model space for each class the source annotates."""
    masks = {}
    if "label_map" in source:
        labels = array_xyz(model_space(root / source["label_map"], spacing, sitk.sitkNearestNeighbor))
        for value, key in source["labels"].items():
            masks[key] = labels == int(value)
    for key, rel in source.get("masks", {}).items():
        masks[key] = array_xyz(model_space(root / rel, spacing, sitk.sitkNearestNeighbor)) > 0
    for key, m in masks.items():
        assert m.shape == shape, (key, m.shape, shape)
    return masks


def source_sha256(source: dict, root: Path, hashes: dict[str, str]) -> str:
    """SHA-256 naming a source's data: over its files' names and SHA-256s (image, label map, masks),
    or over the hashes of the sources a stacked one is made of (`hashes`, by source name). The model's
    provenance records it (`universalseg info` shows it)."""
    import hashlib

    if "stack" in source:
        parts = [f"{role}\0{hashes[source['stack'][role]]}" for role in ("below", "above")]
    else:
        files = [source["image"], *([source["label_map"]] if "label_map" in source else []),
                 *sorted(source.get("masks", {}).values())]
        parts = [f"{rel}\0{hashlib.sha256((root / rel).read_bytes()).hexdigest()}" for rel in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def stacked_source(source: dict, done: dict[str, dict], arrays: dict, spacing) -> dict[str, np.ndarray]:
    """A chest-over-abdomen composite (stacking.py): image, structure map and the two sources' masks."""
    from UniversalSegLib.data.synth import structure_id

    spec = source["stack"]
    below, above = done[spec["below"]], done[spec["above"]]
    first = lowest_slice_above(above["masks"][spec["above_from"]["lowest"]], spec["above_from"]["mm"], spacing[2])

    def side(src: dict, z: slice) -> dict[str, np.ndarray]:
        scan = src["scan"]
        return {"image": arrays[f"image_{scan}"][..., z], "structure_map": arrays[f"structure_{scan}"][..., z],
                **{k: m[..., z] for k, m in src["masks"].items()}}

    anchor = np.argwhere(arrays[f"structure_{below['scan']}"] == structure_id(spec["centre_on"]))
    return stack_above(side(below, slice(None)), side(above, slice(first, None)), anchor.mean(0)[:2])


def main() -> None:
    recipe = load_recipe()
    registry = default_registry()
    root = (REPO / recipe["data_root"]).resolve()
    pre = recipe["preprocessing"]
    spacing = pre["spacing"]
    class_keys: list[str] = []
    for source in recipe["sources"]:
        for key in list(source.get("labels", {}).values()) + list(source.get("masks", {})):
            registry.resolve(key)
            if key not in class_keys:
                class_keys.append(key)
    arrays, scans, sources, done, hashes = {}, {}, [], {}, {}
    for source in recipe["sources"]:
        if "stack" in source:
            composite = stacked_source(source, done, arrays, spacing)
            scan = f"stack:{source['name']}"
            scans[scan] = len(scans)
            arrays[f"image_{scans[scan]}"] = composite.pop("image")
            arrays[f"structure_{scans[scan]}"] = composite.pop("structure_map")
            masks = composite  # the class masks left, bool as the sources' own
        else:
            scan = source["image"]
            if scan not in scans:
                image = array_xyz(model_space(root / scan, spacing, sitk.sitkLinear, default_value=-1024.0))
                scans[scan] = len(scans)
                arrays[f"image_{scans[scan]}"] = normalise_hu(image, pre["hu_window"]).astype(np.float16)
                same_scan = [s for s in recipe["sources"] if s.get("image") == scan]
                arrays[f"structure_{scans[scan]}"] = structure_map(image, same_scan, root, spacing)
            masks = source_labels(source, root, spacing, arrays[f"image_{scans[scan]}"].shape)
        done[source["name"]] = {"scan": scans[scan], "masks": masks}
        shape = arrays[f"image_{scans[scan]}"].shape
        keys = [k for k in class_keys if k in masks]
        arrays[f"labels_{len(sources)}"] = np.stack([masks[k] for k in keys]).astype(np.uint8)
        hashes[source["name"]] = source_sha256(source, root, hashes)
        sources.append({"name": source["name"], "scan": scans[scan], "classes": keys,
                        "sha256": hashes[source["name"]]})
        print(f"{source['name']}: scan {scan} {shape}, {len(keys)} classes, "
              f"{int(arrays[f'labels_{len(sources) - 1}'].sum())} labelled voxels")
    encoder = get_text_encoder()
    classes = [registry.resolve(k) for k in class_keys]
    arrays["class_embeddings"] = embed_prompts(encoder, [c.prompt for c in classes], registry.prompt_template).numpy()
    meta = {"class_keys": class_keys, "sources": sources, "scans": list(scans), "text_encoder": encoder.encoder_id,
            "prompt_template": registry.prompt_template}
    out = HERE / "build"
    out.mkdir(exist_ok=True)
    np.savez_compressed(out / "bundle.npz", meta=np.array(json.dumps(meta)), **arrays)
    print(f"{len(class_keys)} classes -> {out / 'bundle.npz'}")


if __name__ == "__main__":
    main()
