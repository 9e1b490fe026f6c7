"""Save, find, verify and load model files.

A model is a folder `<name>/` holding `manifest.json` and `weights.safetensors`. Loading checks
the SHA-256 recorded in the manifest before reading any tensor and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from UniversalSegLib.errors import ModelFileError
from UniversalSegLib.store.manifest import Manifest

if TYPE_CHECKING:  # torch and the model load only when a model is built: listing models stays fast
    import torch

    from UniversalSegLib.model import UniversalModel

DEFAULT_MODEL = "universalseg-demo"
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "resources" / "models"
MANIFEST_FILE = "manifest.json"


def user_model_dir() -> Path:
    """Where trained and extended models go: $UNIVERSALSEG_MODELS or ~/.universalseg/models."""
    env = os.environ.get("UNIVERSALSEG_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".universalseg" / "models"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A model ready to run, with its manifest and the folder it came from."""

    model: UniversalModel
    manifest: Manifest
    path: Path


def build_model(manifest: Manifest, class_embeddings: torch.Tensor) -> UniversalModel:
    """An untrained model of the shape a manifest describes."""
    from UniversalSegLib.model import UniversalModel

    return UniversalModel(manifest.backbone, manifest.backbone_config, class_embeddings,
                          lpg=manifest.lpg, lpg_hidden=manifest.lpg_hidden)


def save_model(model: UniversalModel, manifest: Manifest, directory: str | Path, overwrite: bool = False,
               weights_dtype: str = "float32") -> Path:
    """Write a model folder atomically (temporary folder, then rename); returns its path.

    `weights_dtype="float16"` stores floating-point tensors in half precision (bundled demo
    models); the default float32 round-trips bit for bit.
    """
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise ModelFileError(f"{directory} already exists; choose another name or remove it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        dtype = getattr(torch, weights_dtype)
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in model.state_dict().items()}
        manifest.weights_dtype = weights_dtype
        weights = tmp / manifest.weights_file
        save_file(tensors, str(weights), metadata={"format": "universalseg-model"})
        manifest.weights_sha256 = sha256_file(weights)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _model_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file() and not p.name.startswith("."))


def list_models() -> list[tuple[Path, Manifest]]:
    """Every installed model: the user's folder first, then the bundled ones."""
    found = []
    for root in (user_model_dir(), BUNDLED_DIR):
        for d in _model_dirs(root):
            try:
                found.append((d, read_manifest(d)))
            except ModelFileError:
                continue
    return found


def find_model(name_or_path: str | Path | None = None) -> Path:
    """Resolve a model folder from a path or a name (user folder first, then bundled)."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_file() and path.name == MANIFEST_FILE:
        path = path.parent
    if (path / MANIFEST_FILE).is_file():
        return path
    for root in (user_model_dir(), BUNDLED_DIR):
        if (root / name / MANIFEST_FILE).is_file():
            return root / name
    known = ", ".join(m.name for _, m in list_models()) or "none"
    raise ModelFileError(f"model {name!r} not found (installed: {known})")


def read_manifest(directory: Path) -> Manifest:
    try:
        return Manifest.from_dict(json.loads((directory / MANIFEST_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{directory}: unreadable model manifest ({e})") from None


def read_manifest_checked(directory: Path) -> Manifest:
    """The manifest, after checking the weights' checksum (cheap enough for `info`)."""
    manifest = read_manifest(directory)
    _verify_weights(directory, manifest)
    return manifest


def _verify_weights(directory: Path, manifest: Manifest) -> Path:
    weights = directory / manifest.weights_file
    if not weights.is_file():
        raise ModelFileError(f"{directory}: weights file {manifest.weights_file} is missing")
    digest = sha256_file(weights)
    if digest != manifest.weights_sha256:
        raise ModelFileError(f"{weights}: checksum mismatch (file is corrupted or was modified); "
                             f"expected sha256 {manifest.weights_sha256[:12]}..., got {digest[:12]}...")
    return weights


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file, read into memory of its own, one tensor at a time.

    `safetensors.torch.load_file` maps the file, and every page a model touches stays resident for
    as long as any of its tensors lives: converting or folding weights would then hold them twice.
    Plain reads into fresh tensors keep loading at one copy. (The format is a little-endian u64
    header length, a JSON header of dtype/shape/byte offsets, then the raw bytes; the caller has
    verified the file's SHA-256, and every size is checked here again.)
    """
    import torch

    tensors = {}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, stop = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]]))
            if tensor.numel() * tensor.element_size() != stop - start:
                raise ValueError(f"tensor {name}: {stop - start} bytes for shape {info['shape']}")
            f.seek(8 + size + start)
            if stop > start and f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != stop - start:
                raise ValueError(f"tensor {name}: file ends early")
            tensors[name] = tensor
    return tensors


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Find, verify (SHA-256) and load a model; raises ModelFileError on any corruption."""

    directory = find_model(name_or_path)
    manifest = read_manifest(directory)
    weights = _verify_weights(directory, manifest)
    try:
        tensors = read_tensors(weights)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ModelFileError(f"{weights}: unreadable weights ({e})") from None
    for key, value in tensors.items():  # one tensor at a time: half-precision files never exist twice
        if value.is_floating_point():
            tensors[key] = value.float()
    if "class_embeddings" not in tensors or tensors["class_embeddings"].shape[0] != len(manifest.classes):
        raise ModelFileError(f"{weights}: class embeddings do not match the manifest's {len(manifest.classes)} classes")
    model = _build_unallocated(manifest, tensors["class_embeddings"])
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelFileError(f"{weights}: weights do not fit the manifest's architecture: {str(e)[:300]}") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ModelFileError(f"{weights}: weights do not cover every tensor of the manifest's architecture")
    return LoadedModel(model.to(device).eval(), manifest, directory)


def _build_unallocated(manifest: Manifest, class_embeddings: torch.Tensor) -> UniversalModel:
    """The manifest's architecture, to be handed the loaded tensors themselves (`assign=True`).

    Built on the meta device, so no randomly initialised copy of the weights ever exists (a
    256-class model is ~0.5 GB: a third of loading's peak). Some networks read values while they
    are built (MONAI 1.6's SwinTransformer calls `.item()` on a linspace), which the meta device
    cannot do: those are built on the CPU instead and their random weights are replaced at once.
    """
    import torch

    try:
        with torch.device("meta"):
            return build_model(manifest, class_embeddings.to("meta"))
    except (RuntimeError, NotImplementedError):
        return build_model(manifest, class_embeddings)


def create_model(name: str, class_keys: list[str], backbone: str = "segresnet", backbone_config: dict | None = None,
                 text_encoder=None, registry=None, **manifest_fields) -> tuple[UniversalModel, Manifest]:
    """A fresh (untrained) model for registry classes, with their prompts embedded once."""
    from UniversalSegLib.registry import default_registry
    from UniversalSegLib.text import embed_prompts, get_text_encoder

    registry = registry or default_registry()
    classes = [registry.resolve(k) for k in class_keys]
    encoder = text_encoder or get_text_encoder()
    manifest = Manifest(name=name, backbone=backbone, backbone_config=dict(backbone_config or {}), classes=classes,
                        text_encoder=encoder.encoder_id, prompt_template=registry.prompt_template, **manifest_fields)
    embeddings = embed_prompts(encoder, [c.prompt for c in classes], manifest.prompt_template)
    return build_model(manifest, embeddings), manifest
