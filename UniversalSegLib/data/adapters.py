"""Adapters: find the cases of public dataset layouts and say what their label values mean.

Each adapter takes (name, root, entry, registry) and returns a `DatasetSpec`. Label ids come from
each dataset's documentation (and its dataset.json where it has one); where a mapping is uncertain
the table says so. A config's `label_map` replaces an adapter's built-in table.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

from UniversalSegLib.data.labels import expand_keys
from UniversalSegLib.data.spec import (
    Case,
    DatasetSpec,
    LabelMapSource,
    MaskSource,
    normalise_label_map,
    resolve_label_key,
    resolve_path,
)
from UniversalSegLib.errors import InputError
from UniversalSegLib.registry import Registry

_EXTS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".nhdr")

# BTCV (Synapse multi-atlas abdomen): 13 organs.
BTCV = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
        7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_vein_and_splenic_vein", 11: "pancreas",
        12: "adrenal_gland_right", 13: "adrenal_gland_left"}
# AMOS22 (dataset.json): 15 organs; 9 is "postcava", 15 "prostate/uterus".
AMOS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
        7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "pancreas", 11: "adrenal_gland_right",
        12: "adrenal_gland_left", 13: "duodenum", 14: "urinary_bladder", 15: "prostate_or_uterus"}
# WORD: 16 organs, kidneys and femoral heads by side, ONE adrenal label (split here). Sides as in the
# WORD paper's list (kidney L=3, R=4; head of femur L=15, R=16); not re-checked against the volumes.
WORD = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "stomach", 6: "gallbladder",
        7: "esophagus", 8: "pancreas", 9: "duodenum", 10: "colon", 11: "intestine", 12: "adrenal_gland",
        13: "rectum", 14: "urinary_bladder", 15: "femur_head_left", 16: "femur_head_right"}
# KiTS19: 1 kidney, 2 tumour; KiTS21 (aggregated_MAJ_seg) and KiTS23: 3 cyst as well.
KITS19 = {1: "kidney", 2: "kidney_tumor"}
KITS23 = {1: "kidney", 2: "kidney_tumor", 3: "kidney_cyst"}
LITS = {1: "liver", 2: "liver_tumor"}
ABDOMENCT1K = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
# CT-ORG: 5 bone and 6 brain have no registry class and are left out.
CTORG = {1: "liver", 2: "urinary_bladder", 3: "lung", 4: "kidney"}
# TotalSegmentator file names that are not registry keys (v1 and v2 names).
TOTALSEG_NAMES = {
    "small_bowel": "intestine", "prostate": "prostate_or_uterus",
    "lung_upper_lobe_left": "lung_left", "lung_lower_lobe_left": "lung_left",
    "lung_upper_lobe_right": "lung_right", "lung_middle_lobe_right": "lung_right",
    "lung_lower_lobe_right": "lung_right",
    "kidney_cyst_left": "kidney_cyst", "kidney_cyst_right": "kidney_cyst",
    # v1 has no whole-heart mask; the union of its chambers and myocardium approximates it (uncertain:
    # v1 leaves out some pericardial fat and great-vessel roots that v2's "heart" includes).
    "heart_myocardium": "heart", "heart_atrium_left": "heart", "heart_atrium_right": "heart",
    "heart_ventricle_left": "heart", "heart_ventricle_right": "heart",
}
# MSD label names that only make sense with the task (e.g. "cancer" in Task03 is a liver tumour).
_MSD_TUMOUR = {"liver": "liver_tumor", "lung": "lung_tumor", "pancreas": "pancreas_tumor",
               "hepaticvessel": "hepatic_vessel_tumor", "colon": "colon_tumor"}
_TUMOUR_WORDS = {"cancer", "tumour", "tumor", "tumors", "tumours", "lesion", "colon cancer primaries"}


def strip_ext(name: str) -> str:
    for ext in sorted(_EXTS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _volumes(folder: Path, pattern: str = "*") -> list[Path]:
    """Image files in a folder, sorted, without macOS '._' shadow files."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(_EXTS))


def _table(entry: dict, default: dict[int, str], registry: Registry, name: str) -> dict[int, str]:
    if entry.get("label_map") is not None:
        return normalise_label_map(entry["label_map"], registry, f"dataset {name}")
    return dict(default)


def _spec(name: str, cases: list[Case], values: dict[int, str], registry: Registry, **kw) -> DatasetSpec:
    return DatasetSpec(name=name, cases=cases, classes=expand_keys(values.values(), registry), **kw)


def _pairs(name: str, images: list[Path], label_for: Callable[[Path], Path], case_id: Callable[[Path], str],
           values: dict[int, str]) -> tuple[list[Case], list[str]]:
    """Cases for images whose label file exists; notes for those without one."""
    cases, missing = [], []
    for img in images:
        label = label_for(img)
        if label.is_file():
            cases.append(Case(img, [LabelMapSource(label, values)], case_id(img)))
        else:
            missing.append(img.name)
    notes = [f"{len(missing)} image(s) without a label file skipped (e.g. {missing[0]})"] if missing else []
    return cases, notes


def _number(path: Path) -> str:
    found = re.findall(r"\d+", strip_ext(path.name))
    return found[-1] if found else strip_ext(path.name)


def _first_dir(root: Path, candidates: list[str]) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return root


# --- formats --------------------------------------------------------------------------------------

def plain(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """Image/label folder pairs matched by file name (`images:`/`labels:` sub-folders of root, default
    images/ and labels/; an image's "_0000" suffix is ignored; needs `label_map`), or `cases:` listed
    explicitly: `{id?, image, label?, label_map?, masks?: {class: path or [paths]}}`, relative to root."""
    default_map = normalise_label_map(entry["label_map"], registry, f"dataset {name}") if entry.get("label_map") else {}
    if entry.get("cases") is not None:
        cases = [_plain_case(name, root, c, default_map, registry) for c in entry["cases"]]
        keys = [s.key if isinstance(s, MaskSource) else k for c in cases for s in c.labels
                for k in (s.values.values() if isinstance(s, LabelMapSource) else [None])]
        return DatasetSpec(name, cases, expand_keys([k for k in keys if k], registry))
    if not default_map:
        raise InputError(f"dataset {name}: the plain format needs a label_map (or explicit cases with masks)")
    img_dir, lab_dir = root / entry.get("images", "images"), root / entry.get("labels", "labels")
    labels = {strip_ext(p.name): p for p in _volumes(lab_dir)}

    def label_for(img: Path) -> Path:
        stem = strip_ext(img.name)
        return labels.get(stem) or labels.get(re.sub(r"_0000$", "", stem)) or lab_dir / "missing"

    cases, notes = _pairs(name, _volumes(img_dir), label_for, lambda p: re.sub(r"_0000$", "", strip_ext(p.name)),
                          default_map)
    return _spec(name, cases, default_map, registry, notes=notes)


def _plain_case(name: str, root: Path, c: dict, default_map: dict[int, str], registry: Registry) -> Case:
    if not isinstance(c, dict) or "image" not in c:
        raise InputError(f"dataset {name}: each case needs an 'image' (and a 'label' or 'masks')")
    image = resolve_path(c["image"], root)
    sources: list = []
    if c.get("label"):
        values = normalise_label_map(c["label_map"], registry, f"dataset {name}") if c.get("label_map") else default_map
        if not values:
            raise InputError(f"dataset {name}: case {c['image']} has a label map but no label_map")
        sources.append(LabelMapSource(resolve_path(c["label"], root), values))
    for cls, paths in (c.get("masks") or {}).items():
        key = resolve_label_key(cls, registry)
        if key is None:
            raise InputError(f"dataset {name}: mask class {cls!r} is not a known class")
        for p in [paths] if isinstance(paths, str) else paths:
            sources.append(MaskSource(resolve_path(p, root), key))
    if not sources:
        raise InputError(f"dataset {name}: case {c['image']} has no label or masks")
    for p in [image, *[s.path for s in sources]]:
        if not p.is_file():
            raise InputError(f"dataset {name}: file not found: {p}")
    return Case(image, sources, str(c.get("id") or strip_ext(image.name)))


def _dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc


def _check_ct(name: str, meta: dict) -> None:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if len(channels) > 1:
        raise InputError(f"dataset {name}: {len(channels)} input channels; UniversalSeg trains on single-channel CT")
    if channels and str(next(iter(channels.values()))).upper() != "CT":
        raise InputError(f"dataset {name}: modality {next(iter(channels.values()))!r}; UniversalSeg trains on CT only")


def _names_to_values(name: str, names: dict[int, str], registry: Registry, task: str = "") -> tuple[dict, list]:
    values, notes = {}, []
    for v, label in sorted(names.items()):
        if v == 0:
            continue
        low = " ".join(re.sub(r"[^a-z0-9]+", " ", label.lower()).split())
        key = _MSD_TUMOUR.get(task) if low in _TUMOUR_WORDS else None
        if key is None and low == "vessel" and task == "hepaticvessel":
            key = "hepatic_vessel"
        key = key or resolve_label_key(label, registry)
        if key is None:
            notes.append(f"label {v} {label!r} has no registry class and is ignored")
        else:
            values[v] = key
    if not values:
        raise InputError(f"dataset {name}: none of its labels {list(names.values())} matches a registry class; "
                         "give a label_map")
    return values, notes


def msd(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """Medical Segmentation Decathlon task folder: dataset.json, imagesTr/, labelsTr/."""
    meta = _dataset_json(root)
    if not meta:
        raise InputError(f"dataset {name}: {root}/dataset.json not found (MSD task folder expected)")
    _check_ct(name, meta)
    task = re.sub(r"^task\d+_?", "", re.sub(r"[^a-z0-9_]", "", str(meta.get("name") or root.name).lower()))
    task = task.replace("_", "")
    notes: list[str] = []
    if entry.get("label_map") is not None:
        values = _table(entry, {}, registry, name)
    else:
        values, notes = _names_to_values(name, {int(k): v for k, v in meta.get("labels", {}).items()}, registry, task)
    cases = []
    for item in meta.get("training", []):
        img, lab = resolve_path(item["image"], root), resolve_path(item["label"], root)
        if img.is_file() and lab.is_file():
            cases.append(Case(img, [LabelMapSource(lab, values)], strip_ext(img.name)))
    if not meta.get("training"):
        cases, extra = _pairs(name, _volumes(root / "imagesTr"), lambda p: root / "labelsTr" / p.name,
                              lambda p: strip_ext(p.name), values)
        notes += extra
    return _spec(name, cases, values, registry, notes=notes)


def nnunet(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """nnU-Net raw folder (v2: labels {name: value}; v1: labels {"value": name}); images <case>_0000."""
    meta = _dataset_json(root)
    if not meta:
        raise InputError(f"dataset {name}: {root}/dataset.json not found (nnU-Net raw folder expected)")
    _check_ct(name, meta)
    raw = meta.get("labels", {})
    if any(isinstance(v, (list, tuple)) for v in raw.values()):
        raise InputError(f"dataset {name}: region-based nnU-Net labels are not supported; give a label_map")
    names = {int(v): k for k, v in raw.items()} if all(str(v).lstrip("-").isdigit() for v in raw.values()) \
        else {int(k): v for k, v in raw.items()}
    notes: list[str] = []
    if entry.get("label_map") is not None:
        values = _table(entry, {}, registry, name)
    else:
        values, notes = _names_to_values(name, names, registry)
    ending = meta.get("file_ending", ".nii.gz")
    labels = sorted(p for p in (root / "labelsTr").glob(f"*{ending}") if not p.name.startswith("."))
    cases, missing = [], []
    for lab in labels:
        cid = lab.name[: -len(ending)]
        img = root / "imagesTr" / f"{cid}_0000{ending}"
        if img.is_file():
            cases.append(Case(img, [LabelMapSource(lab, values)], cid))
        else:
            missing.append(cid)
    if missing:
        notes.append(f"{len(missing)} label(s) without an image skipped (e.g. {missing[0]})")
    return _spec(name, cases, values, registry, notes=notes)


def btcv(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """BTCV: RawData/Training/img/imgXXXX.nii.gz with label/labelXXXX.nii.gz."""
    base = _first_dir(root, ["RawData/Training", "Abdomen/RawData/Training", "Training", "."])
    values = _table(entry, BTCV, registry, name)
    cases, notes = _pairs(name, _volumes(base / "img", "img*"),
                          lambda p: base / "label" / p.name.replace("img", "label", 1), _number, values)
    return _spec(name, cases, values, registry, notes=notes)


def amos(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """AMOS22: imagesTr/labelsTr (+ imagesVa/labelsVa, held out); CT only (case ids <= 500)."""
    values = _table(entry, AMOS, registry, name)
    cases, holdout, notes = [], [], []
    for img_dir, lab_dir in (("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")):
        ct = [p for p in _volumes(root / img_dir) if _number(p).isdigit() and int(_number(p)) <= 500]
        found, extra = _pairs(name, ct, lambda p, d=lab_dir: root / d / p.name, lambda p: strip_ext(p.name), values)
        cases += found
        notes += extra
        if img_dir == "imagesVa":
            holdout += [c.case_id for c in found]
    return _spec(name, cases, values, registry, holdout=holdout, notes=notes)


def word(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """WORD: imagesTr/labelsTr (+ imagesVal/labelsVal, held out); adrenal glands split by side."""
    base = _first_dir(root, ["WORD-V0.1.0", "."])
    values = _table(entry, WORD, registry, name)
    cases, holdout, notes = [], [], []
    for img_dir, lab_dir in (("imagesTr", "labelsTr"), ("imagesVal", "labelsVal")):
        found, extra = _pairs(name, _volumes(base / img_dir), lambda p, d=lab_dir: base / d / p.name,
                              lambda p: strip_ext(p.name), values)
        cases += found
        notes += extra
        if img_dir == "imagesVal":
            holdout += [c.case_id for c in found]
    return _spec(name, cases, values, registry, holdout=holdout, notes=notes)


def kits(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """KiTS19/21/23: case_XXXXX/imaging.nii.gz + segmentation.nii.gz (KiTS21: aggregated_MAJ_seg).

    Kidney sides follow each file's affine. KiTS19's headers drew orientation questions
    (neheller/kits19 issue 9): check the left/right split on a few cases of an old download.
    """
    base = _first_dir(root, ["dataset", "data", "."])
    folders = sorted(p for p in base.glob("case_*") if (p / "imaging.nii.gz").is_file())
    version = str(entry.get("version", "")).strip()
    notes: list[str] = []
    if not version:
        if folders and (folders[0] / "aggregated_MAJ_seg.nii.gz").is_file():
            version = "21"
        elif (base / "kits23.json").is_file() or base.name == "dataset":
            version = "23"
        elif (base / "kits.json").is_file():
            version = "19"
        else:
            version = "23"
            notes.append("KiTS version not detected: assuming KiTS23 label ids (set version: 19 if no cysts)")
    values = _table(entry, KITS19 if version == "19" else KITS23, registry, name)
    cases = []
    for f in folders:
        seg = f / "segmentation.nii.gz"
        seg = seg if seg.is_file() else f / "aggregated_MAJ_seg.nii.gz"
        if seg.is_file():
            cases.append(Case(f / "imaging.nii.gz", [LabelMapSource(seg, values)], f.name))
    return _spec(name, cases, values, registry, notes=notes)


def _numbered(name: str, root: Path, image_prefix: str, label_prefix: str, values: dict, registry: Registry,
              **kw) -> DatasetSpec:
    labels = {_number(p): p for p in root.rglob(f"{label_prefix}-*") if p.name.lower().endswith(_EXTS)
              and not p.name.startswith(".")}
    images = sorted((p for p in root.rglob(f"{image_prefix}-*") if p.name.lower().endswith(_EXTS)
                     and not p.name.startswith(".")), key=lambda p: int(_number(p)) if _number(p).isdigit() else 0)
    cases, notes = _pairs(name, images, lambda p: labels.get(_number(p), root / "missing"), _number, values)
    return _spec(name, cases, values, registry, notes=notes, **kw)


def lits(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """LiTS: volume-N.nii with segmentation-N.nii (1 liver, 2 tumour), in any sub-folders."""
    return _numbered(name, root, "volume", "segmentation", _table(entry, LITS, registry, name), registry)


def ctorg(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """CT-ORG: volume-N.nii.gz with labels-N.nii.gz (lungs and kidneys split by side; bone, brain left out)."""
    return _numbered(name, root, "volume", "labels", _table(entry, CTORG, registry, name), registry)


def abdomenct1k(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """AbdomenCT-1K: Case_XXXXX_0000.nii.gz images and Case_XXXXX.nii.gz masks, in any sub-folders."""
    values = _table(entry, ABDOMENCT1K, registry, name)
    masks = {strip_ext(p.name): p for p in root.rglob("Case_*") if p.name.lower().endswith(_EXTS)
             and not strip_ext(p.name).endswith("_0000")}
    images = sorted(p for p in root.rglob("Case_*_0000*") if p.name.lower().endswith(_EXTS))
    cid = lambda p: strip_ext(p.name)[: -len("_0000")]  # noqa: E731
    cases, notes = _pairs(name, images, lambda p: masks.get(cid(p), root / "missing"), cid, values)
    return _spec(name, cases, values, registry, notes=notes)


def _totalseg_split(root: Path) -> dict[str, str]:
    meta = root / "meta.csv"
    if not meta.is_file():
        raise InputError(f"{meta} not found (split: meta needs TotalSegmentator's meta.csv)")
    text = meta.read_text()
    rows = csv.DictReader(text.splitlines(), delimiter=";" if text.count(";") > text.count(",") else ",")
    return {r["image_id"]: r.get("split", "train") for r in rows}


def totalsegmentator(name: str, root: Path, entry: dict, registry: Registry) -> DatasetSpec:
    """TotalSegmentator: <subject>/ct.nii.gz + segmentations/<structure>.nii.gz, mapped by name."""
    subjects = sorted(p for p in root.iterdir() if (p / "ct.nii.gz").is_file())
    if not subjects:
        return DatasetSpec(name, [], [])
    extra = {str(k): v for k, v in (entry.get("label_map") or {}).items()}
    mapping, ignored = {}, []
    for f in _volumes(subjects[0] / "segmentations"):
        structure = strip_ext(f.name)
        key = resolve_label_key(extra[structure], registry) if structure in extra \
            else TOTALSEG_NAMES.get(structure, structure)
        if key in registry:
            mapping[structure] = key
        else:
            ignored.append(structure)
    notes = [f"{len(ignored)} structures without a registry class ignored: {', '.join(ignored)}"] if ignored else []
    cases = [Case(s / "ct.nii.gz", [MaskSource(s / "segmentations" / f"{n}.nii.gz", k) for n, k in mapping.items()],
                  s.name) for s in subjects]
    holdout: list[str] = []
    if entry.get("split") == "meta":
        split = _totalseg_split(root)
        holdout = [c.case_id for c in cases if split.get(c.case_id) == "val"]
        test = {c.case_id for c in cases if split.get(c.case_id) == "test"}
        cases = [c for c in cases if c.case_id not in test]
        notes.append(f"meta.csv split: {len(holdout)} validation cases held out, {len(test)} test cases left out")
    return DatasetSpec(name, cases, expand_keys(dict.fromkeys(mapping.values()), registry), holdout=holdout,
                       notes=notes)


FORMATS: dict[str, Callable[[str, Path, dict, Registry], DatasetSpec]] = {
    "plain": plain, "msd": msd, "nnunet": nnunet, "btcv": btcv, "amos": amos, "word": word, "kits": kits,
    "lits": lits, "ctorg": ctorg, "abdomenct1k": abdomenct1k, "totalsegmentator": totalsegmentator,
}
