"""Reading config files (YAML or JSON) the way a user writes them.

PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent, so `lr: 2e-3`
or `1e5` would come back as strings and a typed config would refuse them. Our loader adds the
YAML 1.2 (JSON) float pattern on top of the safe loader; everything else is PyYAML's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml


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
