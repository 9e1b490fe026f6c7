"""Backbones, the language-driven parameter generator, dynamic heads and the assembled model."""

# Backbones defined in their own modules register themselves on import; importing any model module
# runs this file first, so they are known before `build_backbone` is called.
from UniversalSegLib.model import genesis_unet  # noqa: F401  (registers "unet_genesis")
from UniversalSegLib.model.backbones import BACKBONES, Backbone, build_backbone, register_backbone
from UniversalSegLib.model.heads import HEAD_PARAMS, PerClassLPG, SharedControllerLPG, apply_dynamic_heads
from UniversalSegLib.model.universal import UniversalModel

__all__ = ["BACKBONES", "Backbone", "build_backbone", "register_backbone", "HEAD_PARAMS", "PerClassLPG",
           "SharedControllerLPG", "apply_dynamic_heads", "UniversalModel"]
