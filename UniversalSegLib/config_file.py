"""Config files (YAML or JSON): reading them the way a user writes them, and typed sections.

PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent, so `lr: 2e-3`
or `1e5` would come back as strings and a typed config would refuse them. Our loader adds the
YAML 1.2 (JSON) float pattern on top of the safe loader; everything else is PyYAML's.

The sections are pydantic models whose fields say in words what they must be (`typed`), so a
refused value is one line naming the field: `train.lr: must be a positive number, got 'abc'`.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError

BaseModelT = TypeVar("BaseModelT", bound=BaseModel)


class _Yaml12FloatLoader(yaml.SafeLoader):
    """The safe loader, with YAML 1.2 floats (`2e-3`, `1E5`, `.5e1`) resolved as floats."""


_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_Yaml12FloatLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def parse_config_text(text: str, suffix: str) -> Any:
    """Parse a config file's text: JSON when `suffix` is `.json`, YAML (with YAML 1.2 floats) otherwise.

    Args:
        text: the file's content.
        suffix: the file name's suffix, e.g. ".yaml" or ".json" (any case).

    Raises the parser's own error (ValueError or yaml.YAMLError) for malformed text.
    """
    if suffix.lower() == ".json":
        return json.loads(text)
    return yaml.load(text, Loader=_Yaml12FloatLoader)  # noqa: S506 - a SafeLoader subclass


def read_config_file(path: str | Path) -> Any:
    """Read and parse a YAML or JSON config file (see `parse_config_text`).

    Args:
        path: the file; its suffix picks the format.
    """
    path = Path(path)
    return parse_config_text(path.read_text(encoding="utf-8"), path.suffix)


# ----------------------------------------------------------------------------------------- typed sections
class Rule:
    """What a config field must be, in words, for its one-line error ("a positive number").

    Put in a field's `Annotated[...]` metadata; `validate_section` reads it when the field is refused.
    """

    def __init__(self, text: str):
        self.text = text


def typed(base: Any, rule: str, **constraints: Any) -> Any:
    """`Annotated[base, Field(strict=True, **constraints), Rule(rule)]`: a checked config field type.

    Strict: a boolean is not a number, 2.0 is not a whole number, "5" is not 5 (int is accepted
    where a float is asked).
    """
    strict = {} if typing.get_origin(base) is typing.Literal else {"strict": True}  # a Literal is exact anyway
    return Annotated[base, Field(**strict, **constraints), Rule(rule)]


def validate_section(model: type[BaseModelT], data: Any, where: str, error: type[Exception],
                     prefix: str = "") -> BaseModelT:
    """Build pydantic `model` from `data`, turning the first validation error into one line.

    Args:
        model: a pydantic model class (`extra="forbid"`, fields typed with `typed`).
        data: the mapping read from the file.
        where: the section's dotted name, prefixed to the field's ("train" gives "train.lr: ...");
            "" for a whole file.
        error: the exception class raised, e.g. UniversalSegError or InputError.
        prefix: put before the message ("config: ").
    """
    if not isinstance(data, dict):
        raise error(f"{prefix}{where + ': ' if where else ''}must be a mapping, got {_shown(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(prefix + describe_error(model, data, e.errors()[0], where)) from None


def describe_error(model: type[BaseModel], data: Any, err: dict, where: str) -> str:
    """One line for one pydantic error: `where.field: must be <rule>, got <value>`."""
    cls, value, path, info = model, data, [where] if where else [], None
    loc = list(err.get("loc", ()))
    while loc and isinstance(cls, type) and issubclass(cls, BaseModel) and loc[0] in cls.model_fields:
        part = loc.pop(0)
        info, path = cls.model_fields[part], [*path, str(part)]
        value = value.get(part) if isinstance(value, dict) else None
        cls = _section_class(info.annotation)
    name = ".".join(path)
    if err["type"] == "extra_forbidden" and loc:
        known = ", ".join(cls.model_fields) if isinstance(cls, type) else ""
        return f"{'.'.join([*path, str(loc[0])])}: unknown key (known: {known})"
    if err["type"] == "value_error" and not loc and info is None:  # a rule across fields (model_validator)
        return err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{name}: missing (required)"
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"{name or 'the top level'}: must be a mapping, got {_shown(value)}"
    rule = _rule(info.metadata, info.annotation) if info else None
    if rule is None:
        rule = err["msg"][0].lower() + err["msg"][1:]
        return f"{name or 'config'}: {rule.replace('input should be', 'must be')}, got {_shown(value)}"
    return f"{name}: must be {rule}, got {_shown(value)}"


def _rule(metadata: list, annotation: Any) -> str | None:
    """The field's `Rule` text: in its own metadata, or in an `Annotated` inside it (`X | None`)."""
    for m in metadata:
        if isinstance(m, Rule):
            return m.text
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Annotated:
            found = _rule(list(arg.__metadata__), None)
            if found:
                return found
    return None


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (a nested section), else None."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
