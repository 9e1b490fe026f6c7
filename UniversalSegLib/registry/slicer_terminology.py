"""Our classes as a 3D Slicer terminology context (the `.term.json` the Slicer module ships and loads).

Slicer's terminology selector finds a segment's category, type and modifier codes only in a loaded
context of that name. Slicer's own lists (DICOM master list, 3D Slicer General Anatomy) lack some of
our types (T10-L5 vertebrae, femur head, hip, gluteus maximus, iliopsoas), so we ship a context
named like the one in every segment's terminology entry (`ClassInfo.terminology_entry`), holding
every category, type and modifier the registry uses. The layout follows Slicer's own files
(Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-*.json, dcmqi's
segment-context schema). Anatomic regions are Slicer's "Anatomic codes - DICOM master list".

Regenerate after changing the registry:
    python -m UniversalSegLib.registry.slicer_terminology \
        UniversalSeg/Resources/SegmentationCategoryTypeModifier-UniversalSeg.term.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from UniversalSegLib.registry.classes import ClassInfo, default_registry

CONTEXT_NAME = "UniversalSeg"
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
MORPHOLOGICALLY_ALTERED = "49755003"  # its types take an anatomic region (showAnatomy, as in Slicer's list)


def _code(triplet: list[str]) -> dict:
    scheme, value, meaning = triplet
    return {"CodingSchemeDesignator": scheme, "CodeValue": value, "CodeMeaning": meaning}


def _find(items: list[dict], triplet: list[str]) -> dict | None:
    return next((i for i in items if (i["CodingSchemeDesignator"], i["CodeValue"]) == tuple(triplet[:2])), None)


def terminology_context(classes: Iterable[ClassInfo] | None = None) -> dict:
    """The terminology context (a JSON-ready dict) holding every code of `classes` (default: the registry).

    A type's or modifier's `3dSlicerLabel` is the class name when exactly one class uses it, and
    `recommendedDisplayRGBValue` its colour, so Slicer shows our names and colours for our codes.
    """
    classes = list(default_registry().classes if classes is None else classes)
    categories: list[dict] = []
    users: dict[tuple, list[ClassInfo]] = {}
    for info in classes:
        term = info.terminology
        category = _find(categories, term["category"])
        if category is None:
            category = {**_code(term["category"]), "showAnatomy": term["category"][1] == MORPHOLOGICALLY_ALTERED,
                        "Type": []}
            categories.append(category)
        kind = _find(category["Type"], term["type"])
        if kind is None:
            kind = {**_code(term["type"]), "recommendedDisplayRGBValue": list(info.color)}
            category["Type"].append(kind)
        modifier = term.get("modifier")
        if modifier:
            kind.setdefault("Modifier", [])
            if _find(kind["Modifier"], modifier) is None:
                kind["Modifier"].append({**_code(modifier), "3dSlicerLabel": info.name,
                                         "recommendedDisplayRGBValue": list(info.color)})
        else:
            users.setdefault((id(category), term["type"][0], term["type"][1]), []).append(info)
    for category in categories:
        for kind in category["Type"]:
            named = users.get((id(category), kind["CodingSchemeDesignator"], kind["CodeValue"]), [])
            if len(named) == 1 and "Modifier" not in kind:
                kind["3dSlicerLabel"] = named[0].name
    return {"SegmentationCategoryTypeContextName": CONTEXT_NAME, "@schema": SCHEMA,
            "SegmentationCodes": {"Category": categories}}


def write_terminology(path: str | Path, classes: Iterable[ClassInfo] | None = None) -> Path:
    """Write the context as Slicer's files are written (UTF-8 JSON, indented)."""
    path = Path(path)
    path.write_text(json.dumps(terminology_context(classes), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m UniversalSegLib.registry.slicer_terminology OUTPUT.term.json")
    print(write_terminology(sys.argv[1]))
