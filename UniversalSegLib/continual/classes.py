"""New classes for an existing model: their metadata, text embeddings and the most similar old class.

A new class may be given as a `ClassInfo`, a dict of its fields, or a bare key. When the key names a
class of the built-in registry that the model lacks (e.g. `heart`), the registry's entry (prompt,
colour, terminology, location) is the starting point and the given fields override it.

Every new class stores where it may lie (`location`, see `registry.location.new_class_location`):
a key the registry does not know is never assumed to lie in the trunk only unless its parents do,
since inference removes a trunk-only class's components from the arms and legs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from UniversalSegLib.config_file import Rule, typed, validate_section
from UniversalSegLib.errors import InputError
from UniversalSegLib.registry import ClassInfo, default_registry
from UniversalSegLib.registry.location import UNKNOWN_PLACE, new_class_location
from UniversalSegLib.store import Manifest

if TYPE_CHECKING:
    import torch

ClassSpec = ClassInfo | dict[str, Any] | str


def _default_colour(key: str) -> list[int]:
    """A stable, fairly saturated colour derived from the key (so re-runs give the same colour)."""
    digest = hashlib.sha256(key.encode()).digest()
    return [64 + digest[i] % 176 for i in range(3)]


def _rgb_text(value: Any) -> Any:
    """"R,G,B" text (as a CLI or YAML user might write it) as a list; anything else as given."""
    if isinstance(value, str):
        try:
            return [int(v.strip()) for v in value.split(",")]
        except ValueError:
            return value
    return value


def _one_or_more(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


RGB = Annotated[list[Annotated[int, Field(strict=True, ge=0, le=255)]], Field(min_length=3, max_length=3),
                BeforeValidator(_rgb_text), Rule("three whole numbers 0-255")]
Names = Annotated[list[Annotated[str, Field(strict=True)]], BeforeValidator(_one_or_more),
                  Rule("a name or a list of names")]
Text = typed(str, "text")


def _lo_hi(value: list[float]) -> list[float]:
    if value[0] > value[1]:
        raise ValueError("lo above hi")
    return value


Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
LateralRange = Annotated[list[Number], Field(min_length=2, max_length=2), AfterValidator(_lo_hi),
                         Rule("two numbers [lo, hi], lo <= hi (trunk half-widths, patient left positive)")]


class LocationSpec(BaseModel):
    """Where a new class may lie (`ClassInfo.location`; the rules are in `inference/plausibility.py`)."""

    model_config = ConfigDict(extra="forbid")

    trunk: typed(bool, "true or false") | None = None
    lateral: LateralRange | None = None
    caudal_to: Names | None = None


class NewClassSpec(BaseModel):
    """A new class as a user gives it (a classes file, the CLI, the Slicer wizard); unset fields are None.

    Any `ClassInfo` field may be given; `colour` is the docs' spelling of `color`. `location` gives
    any of trunk (true: never in an arm or leg), lateral and caudal_to; unset ones keep the default
    (`registry.location.new_class_location`).
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt field would otherwise be dropped without a word

    key: typed(str, "letters, digits and _", pattern=r"^[A-Za-z0-9_]+$")
    name: Text | None = None
    prompt: Text | None = None
    group: Text | None = None
    parents: Names | None = None
    synonyms: Names | None = None
    color: RGB | None = None
    colour: RGB | None = None
    laterality: Text | None = None
    pair: Text | None = None
    terminology: typed(dict[str, list[str]], "a mapping of coded triplets") | None = None
    postprocess: Text | None = None
    template_id: typed(int, "a whole number") | None = None
    location: LocationSpec | None = None

    @model_validator(mode="after")
    def _one_spelling(self) -> NewClassSpec:
        if self.colour is not None and self.color is not None and self.colour != self.color:
            raise ValueError("give colour or color, not both")
        return self

    def class_fields(self) -> dict[str, Any]:
        """The fields that were given, as `ClassInfo` names them."""
        data = self.model_dump(exclude_none=True, exclude={"colour"})
        if self.colour is not None:
            data["color"] = list(self.colour)
        return data


def _checked_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """The user's fields with their types checked (ClassInfo itself checks only key and group)."""
    key = spec.get("key")
    prefix = f"new class {key!r}: " if isinstance(key, str) and key else f"new class {spec!r}: "
    return validate_section(NewClassSpec, spec, "", InputError, prefix=prefix).class_fields()


def _from_dict(spec: dict[str, Any]) -> tuple[ClassInfo, dict[str, Any] | None]:
    """The class (registry entry + given fields) and the location the user gave (None: none)."""
    data = _checked_fields(spec)
    key = data["key"]
    given_location = data.pop("location", None) or None
    base = default_registry()[key].to_dict() if key in default_registry() else {}
    merged = {**base, **data}
    merged.setdefault("name", key.replace("_", " ").capitalize())
    merged.setdefault("group", "other")
    merged.setdefault("color", _default_colour(key))
    try:
        return ClassInfo.from_dict(merged), given_location
    except (TypeError, ValueError) as e:
        raise InputError(f"new class {key!r}: {e}") from None


def _as_class(spec: ClassSpec) -> tuple[ClassInfo, dict[str, Any] | None]:
    if isinstance(spec, ClassInfo):
        return ClassInfo.from_dict(spec.to_dict()), dict(spec.location) or None
    if isinstance(spec, str):
        return _from_dict({"key": spec})
    if isinstance(spec, dict):
        return _from_dict(spec)
    raise InputError(f"new class {spec!r}: give a key or an object with a key")


def _caudal_to_problem(c: ClassInfo, given: dict[str, Any] | None, names: set[str]) -> str | None:
    below = list((given or {}).get("caudal_to", ()))
    if c.key in below:
        return f"class {c.key!r}: location.caudal_to names the class itself"
    unknown = [k for k in below if k not in names]
    if unknown:
        return (f"class {c.key!r}: location.caudal_to: {', '.join(unknown)} not among the model's classes "
                "or the new ones")
    return None


def _resolve_locations(classes: list[ClassInfo], given: dict[str, dict[str, Any] | None],
                       model_classes: dict[str, ClassInfo]) -> None:
    """Store each new class's location (`new_class_location`), a new parent's before its child's."""
    new = {c.key: c for c in classes}
    done: set[str] = set()

    def resolve(c: ClassInfo, visiting: frozenset[str]) -> None:
        if c.key in done:
            return
        parents = []
        for p in c.parents:
            if p in new and p not in visiting:
                resolve(new[p], visiting | {c.key})
                parents.append(new[p])
            elif p in new:  # a cycle of parents: nothing known about the place
                parents.append(ClassInfo(p, p, "other", location=dict(UNKNOWN_PLACE)))
            else:
                parents.append(model_classes.get(p) or ClassInfo(p, p, "other"))
        c.location = new_class_location(c.key, given[c.key], parents)
        done.add(c.key)

    for c in classes:
        resolve(c, frozenset({c.key}))


def check_new_classes(specs: Sequence[ClassSpec], manifest: Manifest) -> tuple[list[ClassInfo], list[str]]:
    """The classes to add as the model would store them (locations resolved) and every problem, one
    line each in the order of the classes (none: `make_new_classes` accepts them). The Slicer wizard
    shows them all before training (`universalseg classes --new-classes`).

    Args:
        specs: the new classes (ClassInfo, dict of fields, or key).
        manifest: the base model's manifest (its name, class keys and classes).
    """
    if not specs:
        return [], ["give at least one new class"]
    made, problems = [], []
    for spec in specs:
        try:
            made.append(_as_class(spec))
        except InputError as e:
            problems.append(str(e))
    classes = [c for c, _ in made]
    known = set(manifest.class_keys)
    spec_keys = [_spec_key(spec) for spec in specs]  # a class with a bad field still counts as given
    names = known | {k for k in spec_keys if k}
    for c, given in made:
        if c.key in known:
            problems.append(f"class {c.key!r} is already in model {manifest.name!r}; choose a new key")
        if spec_keys.count(c.key) > 1:
            problems.append(f"class {c.key!r} is given twice")
        unknown = [p for p in c.parents if p not in names]
        if unknown:
            problems.append(f"class {c.key!r}: parent(s) {', '.join(unknown)} are not classes of the model")
        problems.append(_caudal_to_problem(c, given, names))
    problems = list(dict.fromkeys(p for p in problems if p))  # a key given twice: said once
    if not problems:
        _resolve_locations(classes, {c.key: given for c, given in made}, {c.key: c for c in manifest.classes})
    return classes, problems


def _spec_key(spec: ClassSpec) -> str | None:
    key = spec.key if isinstance(spec, ClassInfo) else spec if isinstance(spec, str) else (
        spec.get("key") if isinstance(spec, dict) else None)
    return key if isinstance(key, str) else None


def make_new_classes(specs: Sequence[ClassSpec], manifest: Manifest) -> list[ClassInfo]:
    """Validated `ClassInfo`s for the classes to add: keys new to the model, parents and
    `location.caudal_to` known, and each with the location to store (`registry.location`).
    Raises InputError with the first problem (`check_new_classes` lists them all).

    Args:
        specs: the new classes (ClassInfo, dict of fields, or key).
        manifest: the base model's manifest (its name, class keys and classes).
    """
    classes, problems = check_new_classes(specs, manifest)
    if problems:
        raise InputError(problems[0])
    return classes


def embed_new_classes(classes: Sequence[ClassInfo], manifest: Manifest, expected_dim: int,
                      text_encoder=None) -> torch.Tensor:
    """Embed the new prompts with the model's own text encoder and prompt template."""
    from UniversalSegLib.text import embed_prompts, get_text_encoder

    try:
        encoder = text_encoder or get_text_encoder(manifest.text_encoder)
    except (ImportError, OSError, ValueError) as e:
        raise InputError(f"cannot load the model's text encoder {manifest.text_encoder!r}: {e}") from None
    if getattr(encoder, "encoder_id", manifest.text_encoder) != manifest.text_encoder:
        raise InputError(f"text encoder {encoder.encoder_id!r} differs from the model's {manifest.text_encoder!r}")
    emb = embed_prompts(encoder, [c.prompt for c in classes], manifest.prompt_template)
    if emb.shape[1] != expected_dim:
        raise InputError(f"text encoder gives {emb.shape[1]}-d embeddings; the model expects {expected_dim}")
    return emb


@dataclass
class SimilarClass:
    """The old class whose text embedding is closest (cosine) to a new class's."""

    index: int
    key: str
    cosine: float


def most_similar(new_embeddings: torch.Tensor, old_embeddings: torch.Tensor, old_keys: Sequence[str]
                 ) -> list[SimilarClass]:
    """For each new embedding, the old class of highest cosine similarity."""
    import torch

    new = torch.nn.functional.normalize(new_embeddings.float(), dim=1)
    old = torch.nn.functional.normalize(old_embeddings.float().to(new.device), dim=1)
    cos = new @ old.T
    best = cos.max(dim=1)
    return [SimilarClass(int(i), old_keys[int(i)], float(v)) for v, i in zip(best.values, best.indices)]
