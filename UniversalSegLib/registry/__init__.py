"""The class registry: every structure we know, with names, colours, terminology and rules."""

from UniversalSegLib.registry.classes import (
    GROUPS,
    ClassInfo,
    Registry,
    default_registry,
    safe_file_name,
)

__all__ = ["GROUPS", "ClassInfo", "Registry", "default_registry", "safe_file_name"]
