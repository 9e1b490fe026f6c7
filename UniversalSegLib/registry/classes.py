"""Class metadata (one `ClassInfo` per structure) and lookup by key, name or synonym.

The built-in classes live in `classes.json` beside this file. A model file carries the full
`ClassInfo` of each of its own classes, so a model with user-added classes is self-contained.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from UniversalSegLib.errors import UnknownClassError

GROUPS = ("organ", "vessel", "tumour", "bone", "muscle", "other")
POSTPROCESS_RULES = (None, "largest_component", "split_pair", "within_parents")
DEFAULT_PROMPT_TEMPLATE = "A computerized tomography of a {name}"
_REGISTRY_FILE = Path(__file__).with_name("classes.json")


@dataclass
class ClassInfo:
    """Everything we know about one structure.

    `terminology` holds DICOM coded triplets [scheme, code, meaning] under the keys
    category, type, and optionally modifier (laterality) and region (anatomic region).
    `parents` are host structures (tumour -> organ); `pair` is the other side of a paired organ.
    `location` says where the structure may lie, checked on every prediction
    (`inference/plausibility.py`): "trunk" (bool, default true: never in an arm or other limb),
    "lateral" ([lo, hi]: the centroid's signed distance from the body midline, in trunk
    half-widths, patient left positive) and "caudal_to" (keys whose centroids lie above this one's).
    """

    key: str
    name: str
    group: str
    prompt: str = ""
    synonyms: list[str] = field(default_factory=list)
    laterality: str | None = None
    parents: list[str] = field(default_factory=list)
    pair: str | None = None
    color: list[int] = field(default_factory=lambda: [128, 174, 128])
    terminology: dict[str, list[str]] = field(default_factory=dict)
    postprocess: str | None = None
    template_id: int | None = None
    location: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.key):
            raise ValueError(f"class key {self.key!r} must be letters, digits and _ only")
        if self.group not in GROUPS:
            raise ValueError(f"class {self.key}: group {self.group!r} is not one of {GROUPS}")
        if self.postprocess not in POSTPROCESS_RULES:
            raise ValueError(f"class {self.key}: unknown post-processing rule {self.postprocess!r}")
        if not self.prompt:
            self.prompt = self.name.lower()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClassInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def terminology_entry(self, context: str = "UniversalSeg") -> str:
        """The terminology tag value 3D Slicer stores per segment, serialised as Slicer does
        (vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry): an absent code is "^^", never
        empty, since Slicer's reader splits on "~" dropping a trailing empty field and then refuses an
        entry with fewer than 7 fields."""

        def triplet(name: str) -> str:
            value = self.terminology.get(name)
            return "^".join(value) if value else "^^"

        region = triplet("region")
        return "~".join([context, triplet("category"), triplet("type"), triplet("modifier"),
                         "Anatomic codes - DICOM master list" if region != "^^" else "", region, "^^"])


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def safe_file_name(key: str) -> str:
    """A file-system-safe name (no spaces or separators) for a class key or display name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._") or "class"


class Registry:
    """An ordered collection of `ClassInfo` with lookup by key, display name or synonym."""

    def __init__(self, classes: Iterable[ClassInfo], prompt_template: str = DEFAULT_PROMPT_TEMPLATE):
        self.classes: list[ClassInfo] = list(classes)
        self.prompt_template = prompt_template
        self._by_key = {c.key: c for c in self.classes}
        if len(self._by_key) != len(self.classes):
            raise ValueError("duplicate class keys in registry")
        self._aliases: dict[str, str] = {}
        for c in self.classes:
            for alias in [c.key, c.name, *c.synonyms]:
                self._aliases.setdefault(_normalise(alias), c.key)

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def __getitem__(self, key: str) -> ClassInfo:
        return self._by_key[key]

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.classes]

    def resolve(self, name: str) -> ClassInfo:
        """Find a class by key, display name or synonym (case and punctuation ignored)."""
        key = self._aliases.get(_normalise(name))
        if key is None:
            close = self.suggest(name)
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise UnknownClassError(f"unknown class {name!r}{hint}; `universalseg classes` lists them")
        return self._by_key[key]

    def suggest(self, name: str, limit: int = 5) -> list[str]:
        """Keys of classes whose key, name or a synonym is close to `name` (typos) or contains it."""
        wanted = _normalise(name)
        if not wanted:
            return []
        similar = difflib.get_close_matches(wanted, list(self._aliases), n=limit * 3, cutoff=0.75)
        containing = [alias for alias in self._aliases if wanted in alias]
        keys = dict.fromkeys(self._aliases[alias] for alias in [*similar, *containing])
        return list(keys)[:limit]

    def prompt(self, key: str) -> str:
        return self.prompt_template.format(name=self._by_key[key].prompt)

    def template_32(self) -> list[ClassInfo]:
        """The paper's 32-class template, in template order."""
        return sorted((c for c in self.classes if c.template_id), key=lambda c: c.template_id)

    def with_classes(self, extra: Iterable[ClassInfo]) -> Registry:
        """A new registry with `extra` appended (keys must be new)."""
        return Registry([*self.classes, *extra], self.prompt_template)

    def subset(self, keys: Iterable[str]) -> Registry:
        return Registry([self._by_key[k] for k in keys], self.prompt_template)


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The built-in registry shipped with the package."""
    data = json.loads(_REGISTRY_FILE.read_text())
    return Registry([ClassInfo.from_dict(c) for c in data["classes"]], data["prompt_template"])
