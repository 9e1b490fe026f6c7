"""The class list of the panel: grouping by organ / vessel / tumour / ..., and searching."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

GROUP_TITLES = {"organ": "Organs", "vessel": "Vessels", "tumour": "Tumours and lesions", "bone": "Bones",
                "muscle": "Muscles", "other": "Other"}

ClassDict = Mapping[str, Any]


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).strip()


def group_classes(classes: Iterable[ClassDict]) -> list[tuple[str, list[ClassDict]]]:
    """(group, classes) in the panel's group order, keeping the model's class order inside a group."""
    groups: dict[str, list[ClassDict]] = {}
    for c in classes:
        group = c.get("group") or "other"
        groups.setdefault(group if group in GROUP_TITLES else "other", []).append(c)
    return [(g, groups[g]) for g in GROUP_TITLES if g in groups]


def matches(cls: ClassDict, query: str) -> bool:
    """Whether a class matches the search box: every word is found in its key, name, synonyms or group."""
    words = _normalise(query).split()
    if not words:
        return True
    haystack = " ".join(_normalise(t) for t in [cls.get("key", ""), cls.get("name", ""), cls.get("group", ""),
                                                *cls.get("synonyms", [])])
    return all(w in haystack for w in words)


def display_name(cls: ClassDict) -> str:
    return str(cls.get("name") or cls.get("key"))


def selection_summary(selected: Sequence[str], total: int) -> str:
    if total == 0:
        return "No model loaded"
    if len(selected) == total:
        return f"All {total} structures selected"
    return f"{len(selected)} of {total} structures selected"


def _split_like_slicer(text: str, separator: str) -> list[str]:
    """vtksys::SystemTools::Split as Slicer's DeserializeTerminologyEntry uses it: no field after a
    trailing separator (so "a~b~" has two fields)."""
    parts = text.split(separator)
    return parts[:-1] if text.endswith(separator) else parts


def standard_segment_name(entry: str) -> str | None:
    """A segment name made of its terminology codes' meanings, e.g. "Kidney Left" or "Neoplasm in Liver"
    (type, modifier, anatomic region), as TotalSegmentator's "use standard segment names" assembles
    them; None when `entry` is not a terminology entry Slicer would accept."""
    fields = _split_like_slicer(entry or "", "~")
    if len(fields) != 7:
        return None
    meanings = [part.split("^")[2] if len(part.split("^")) == 3 else "" for part in fields]
    kind, modifier, region = meanings[2], meanings[3], meanings[5]
    if not kind:
        return None
    name = f"{kind} {modifier}" if modifier else kind
    return f"{name} in {region}" if region else name
