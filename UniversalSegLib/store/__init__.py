"""Model files: safetensors weights + JSON manifest, checksums, bundled and user model folders."""

from UniversalSegLib.store.manifest import FORMAT_VERSION, Manifest, Preprocessing
from UniversalSegLib.store.modelfile import (
    BUNDLED_DIR,
    DEFAULT_MODEL,
    LoadedModel,
    build_model,
    create_model,
    find_model,
    list_models,
    load_model,
    read_manifest,
    read_manifest_checked,
    save_model,
    sha256_file,
    user_model_dir,
)

__all__ = ["FORMAT_VERSION", "Manifest", "Preprocessing", "BUNDLED_DIR", "DEFAULT_MODEL", "LoadedModel",
           "build_model", "create_model", "find_model", "list_models", "load_model", "read_manifest",
           "read_manifest_checked", "save_model", "sha256_file", "user_model_dir"]
