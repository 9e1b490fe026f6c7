"""Model files: safetensors weights + JSON manifest with an integrity record, bundled and user model folders."""

from UniversalSegLib.store.manifest import FORMAT_VERSION, Manifest, Preprocessing
from UniversalSegLib.store.modelfile import (
    BUNDLED_DIR,
    DEFAULT_MODEL,
    LoadedModel,
    ModelEntry,
    build_model,
    check_model,
    create_model,
    find_model,
    list_models,
    load_model,
    read_manifest,
    read_manifest_checked,
    rehash_model,
    save_model,
    scan_models,
    sha256_file,
    user_model_dir,
)

__all__ = ["FORMAT_VERSION", "Manifest", "Preprocessing", "BUNDLED_DIR", "DEFAULT_MODEL", "LoadedModel", "ModelEntry",
           "build_model", "check_model", "create_model", "find_model", "list_models", "load_model", "read_manifest",
           "read_manifest_checked", "rehash_model", "save_model", "scan_models", "sha256_file", "user_model_dir"]
