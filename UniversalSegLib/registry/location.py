"""Where a class may lie (`ClassInfo.location`): the value inference uses, and the default for a class
a user adds to a model.

The rules themselves (`trunk`, `lateral`, `caudal_to`) are applied in `inference/plausibility.py`. A
class without a stored location falls back to the built-in registry's entry for its key, else to
"trunk" alone, the registry's own default. That fallback is right for the anatomy the registry
describes, but wrong for a structure it does not know: a user-added humerus, deltoid or limb lesion
would be removed from every arm and have its arm blanked before the model sees it. So a class added
to a model always stores a location (`new_class_location`), and an unknown place is `trunk: false`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from UniversalSegLib.registry.classes import ClassInfo, default_registry

UNKNOWN_PLACE = {"trunk": False}  # never removed from a limb; limb blanking is off while it is computed


def effective_location(info: ClassInfo) -> dict[str, Any]:
    """The location inference applies to `info`: its own, else the default registry's for its key,
    else {} ("trunk" alone, `Location`'s default).

    Args:
        info: the class (e.g. from a model's manifest).
    """
    if info.location:
        return dict(info.location)
    registry = default_registry()
    return dict(registry[info.key].location) if info.key in registry else {}


def trunk_only(info: ClassInfo) -> bool:
    """Whether `info` may lie only in the trunk (never in an arm or leg), as inference decides it."""
    return bool(effective_location(info).get("trunk", True))


def new_class_location(key: str, given: Mapping[str, Any] | None, parents: Sequence[ClassInfo]) -> dict[str, Any]:
    """The location to store for a class added to a model.

    A key the built-in registry knows starts from the registry's location; any other starts from the
    default: with parents (a tumour inside the liver), trunk-only exactly when every parent is; with
    none, `UNKNOWN_PLACE` (the structure may lie in an arm or leg). The user's `given` fields
    (trunk, lateral, caudal_to) override the start one by one.

    Args:
        key: the new class's key.
        given: the location the user gave (already checked), or None.
        parents: the `ClassInfo` of each parent (model classes or other new classes, resolved first).
    """
    registry = default_registry()
    if key in registry and registry[key].location:
        start = dict(registry[key].location)
    elif parents:
        start = {"trunk": all(trunk_only(p) for p in parents)}
    else:
        start = dict(UNKNOWN_PLACE)
    return {**start, **dict(given or {})}
