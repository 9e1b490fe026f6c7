"""New classes for an existing model: their metadata, text embeddings and the most similar old class.

A new class may be given as a `ClassInfo`, a dict of its fields, or a bare key. When the key names a
class of the built-in registry that the model lacks (e.g. `heart`), the registry's entry (prompt,
colour, terminology) is the starting point and the given fields override it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from UniversalSegLib.errors import InputError
from UniversalSegLib.registry import ClassInfo, default_registry
from UniversalSegLib.store import Manifest

ClassSpec = ClassInfo | dict[str, Any] | str


def _default_colour(key: str) -> list[int]:
    """A stable, fairly saturated colour derived from the key (so re-runs give the same colour)."""
    digest = hashlib.sha256(key.encode()).digest()
    return [64 + digest[i] % 176 for i in range(3)]


_FIELDS = frozenset(ClassInfo.__dataclass_fields__) | {"colour"}


def _colour(key: str, value: Any) -> list[int]:
    """Three whole numbers 0-255 (a list, or "R,G,B" text as a CLI or YAML user might write it)."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        rgb = [int(str(v).strip()) for v in parts] if isinstance(parts, (list, tuple)) else []
    except ValueError:
        rgb = []
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise InputError(f"new class {key!r}: colour must be three whole numbers 0-255, not {value!r}")
    return rgb


def _text_list(key: str, name: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise InputError(f"new class {key!r}: {name} must be a name or a list of names, not {value!r}")
    return list(items)


def _checked_fields(key: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The user's fields with their types checked (ClassInfo itself checks only key and group)."""
    data = dict(spec)
    unknown = sorted(set(data) - _FIELDS)
    if unknown:  # a misspelt field would otherwise be dropped without a word
        raise InputError(f"new class {key!r}: unknown field(s) {', '.join(map(str, unknown))}")
    if "colour" in data:  # accept British spelling, as the docs use it
        if data.get("color") is not None and data["color"] != data["colour"]:
            raise InputError(f"new class {key!r}: give colour or color, not both")
        data["color"] = data.pop("colour")
    if data.get("color") is not None:
        data["color"] = _colour(key, data["color"])
    for name in ("parents", "synonyms"):
        if data.get(name) is not None:
            data[name] = _text_list(key, name, data[name])
    for name in ("name", "prompt", "group"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise InputError(f"new class {key!r}: {name} must be text, not {data[name]!r}")
    return data


def _from_dict(spec: dict[str, Any]) -> ClassInfo:
    key = spec.get("key")
    if not key or not isinstance(key, str):
        raise InputError(f"new class {spec!r} has no key")
    data = _checked_fields(key, spec)
    base = default_registry()[key].to_dict() if key in default_registry() else {}
    merged = {**base, **{k: v for k, v in data.items() if v is not None}}
    merged.setdefault("name", key.replace("_", " ").capitalize())
    merged.setdefault("group", "other")
    merged.setdefault("color", _default_colour(key))
    try:
        return ClassInfo.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise InputError(f"new class {key!r}: {e}") from None


def make_new_classes(specs: Sequence[ClassSpec], manifest: Manifest) -> list[ClassInfo]:
    """Validated `ClassInfo`s for the classes to add: keys new to the model, parents known."""
    if not specs:
        raise InputError("give at least one new class")
    classes = []
    for spec in specs:
        if isinstance(spec, ClassInfo):
            classes.append(ClassInfo.from_dict(spec.to_dict()))
        elif isinstance(spec, str):
            classes.append(_from_dict({"key": spec}))
        elif isinstance(spec, dict):
            classes.append(_from_dict(spec))
        else:
            raise InputError(f"new class {spec!r}: give a key or an object with a key")
    known = set(manifest.class_keys)
    new_keys = [c.key for c in classes]
    for c in classes:
        if c.key in known:
            raise InputError(f"class {c.key!r} is already in model {manifest.name!r}; choose a new key")
        if new_keys.count(c.key) > 1:
            raise InputError(f"class {c.key!r} is given twice")
        unknown = [p for p in c.parents if p not in known and p not in new_keys]
        if unknown:
            raise InputError(f"class {c.key!r}: parent(s) {', '.join(unknown)} are not classes of the model")
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
    new = torch.nn.functional.normalize(new_embeddings.float(), dim=1)
    old = torch.nn.functional.normalize(old_embeddings.float().to(new.device), dim=1)
    cos = new @ old.T
    best = cos.max(dim=1)
    return [SimilarClass(int(i), old_keys[int(i)], float(v)) for v, i in zip(best.values, best.indices)]
