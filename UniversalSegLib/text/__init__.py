"""Text encoders that turn class prompts into the embeddings the parameter generator reads.

Imported lazily: reading a model manifest needs only `ids`, not torch or transformers.
"""

from __future__ import annotations

import importlib

from UniversalSegLib.text.ids import DEFAULT_ENCODER_ID

_LAZY = {name: "UniversalSegLib.text.encoders"
         for name in ("CLIPTextEncoder", "MiniLMEncoder", "TextEncoder", "embed_prompts", "get_text_encoder")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'UniversalSegLib.text' has no attribute {name!r}")


__all__ = ["DEFAULT_ENCODER_ID", *_LAZY]
