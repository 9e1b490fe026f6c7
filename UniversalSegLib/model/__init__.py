"""Backbones, the language-driven parameter generator, dynamic heads and the assembled model."""

from UniversalSegLib.model.backbones import BACKBONES, Backbone, build_backbone, register_backbone
from UniversalSegLib.model.heads import HEAD_PARAMS, PerClassLPG, SharedControllerLPG, apply_dynamic_heads
from UniversalSegLib.model.universal import UniversalModel

__all__ = ["BACKBONES", "Backbone", "build_backbone", "register_backbone", "HEAD_PARAMS", "PerClassLPG",
           "SharedControllerLPG", "apply_dynamic_heads", "UniversalModel"]
