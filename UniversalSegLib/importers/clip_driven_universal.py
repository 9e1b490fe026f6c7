"""Import the CLIP-Driven Universal Model checkpoints published by Liu et al. (ICCV 2023).

The authors publish two PyTorch pickles (U-Net and Swin UNETR backbones, 32 classes). This is the
one place in UniversalSeg that reads a pickle: only the file the user names, only with
`torch.load(weights_only=True)` (tensors in plain containers; any other object is refused). The
tensors are renamed onto our model, checked name by name and shape by shape, and written as a
normal model file (safetensors + manifest) with the license and the source file's SHA-256.
"""

from __future__ import annotations

import datetime
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from UniversalSegLib.errors import InputError, ModelFileError
from UniversalSegLib.model import UniversalModel
from UniversalSegLib.registry import default_registry
from UniversalSegLib.registry.classes import DEFAULT_PROMPT_TEMPLATE
from UniversalSegLib.store import Manifest, Preprocessing, save_model, sha256_file, user_model_dir

FORMAT = "clip-driven-universal"
LICENSE = "CC BY-NC-ND 4.0 (non-commercial; not redistributable)"
# The stored embeddings are OpenAI CLIP's `encode_text` output: the *projected* ViT-B/32 text feature.
TEXT_ENCODER = "clip:openai/clip-vit-base-patch32:projected"
NUM_CLASSES = 32
EMBED_DIM = 512
MAX_LISTED = 6  # names listed per kind of problem in an error message

# The published heads' names -> ours (prefix match; `organ_embedding` is matched whole).
HEAD_NAMES = (("GAP.", "image_feature_head."), ("precls_conv.", "voxel_feature_head."),
              ("controller.", "lpg.controller."), ("text_to_vision.", "lpg.text_to_vision."))
EMBEDDING_NAMES = ("organ_embedding", "class_embeddings")


@dataclass(frozen=True)
class BackboneSpec:
    """How one published backbone becomes ours: our backbone name, its config, our key prefix."""

    ours: str
    config: dict[str, Any] = field(default_factory=dict)
    prefix: str = "backbone."
    label: str = ""
    bare_names: re.Pattern[str] | None = None  # backbone keys a checkpoint may store without `backbone.`


BACKBONES = {
    "unet": BackboneSpec("unet_genesis", {}, "backbone.", "3D U-Net (Models Genesis)"),
    # The reference's own patch merging (see model/swin_merging.py), not MONAI's current one.
    "swinunetr": BackboneSpec("swinunetr", {"feature_size": 48, "downsample": "merging_reference"},
                              "backbone.net.", "Swin UNETR (feature size 48)",
                              re.compile(r"^(swinViT|encoder\d+|decoder\d+)\.")),
}


def published_preprocessing() -> Preprocessing:
    """The authors' inference settings: RAS, 1.5 mm, HU [-175, 250], 96^3 windows, overlap 0.5 (Gaussian
    blending, as our sliding window always blends)."""
    return Preprocessing(orientation="RAS", spacing=[1.5, 1.5, 1.5], hu_window=[-175.0, 250.0],
                         patch_size=[96, 96, 96], foreground_crop=True, overlap=0.5, threshold=0.5)


def _weights_only_reason(error: Exception) -> str:
    """The one informative sentence of torch's long weights-only refusal."""
    text = " ".join(str(error).split())
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s+Please use|\s+Check the documentation|$)", text)
    return (m.group(1) if m and m.group(1) else text[:160]).rstrip(". ")


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (`{"net": state, ...}` or a bare state dict), read weights-only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(f"{path.name}: refused: not a plain weights file ({_weights_only_reason(e)}); "
                             "only tensors in dictionaries are read, other pickled objects never") from None
    except Exception as e:  # torch raises many kinds on a truncated or foreign file
        raise ModelFileError(f"{path.name}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    state = obj.get("net", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not state:
        raise ModelFileError(f"{path.name}: no state dict found (expected a dict of tensors, or one under 'net')")
    odd = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise ModelFileError(f"{path.name}: the state dict holds entries that are not tensors: {_listing(odd)}")
    return dict(state)


def _published_to_ours(name: str, spec: BackboneSpec) -> str | None:
    """Our parameter name for a published one (after `module.` is stripped), or None if unknown."""
    if spec.bare_names is not None and spec.bare_names.match(name):
        name = "backbone." + name
    if name == EMBEDDING_NAMES[0]:
        return EMBEDDING_NAMES[1]
    if name.startswith("backbone."):
        return spec.prefix + name.removeprefix("backbone.")
    for theirs, ours in HEAD_NAMES:
        if name.startswith(theirs):
            return ours + name.removeprefix(theirs)
    return None


def _ours_to_published(name: str, spec: BackboneSpec) -> str:
    """The manifest spelling of one of our names (for messages about missing parameters)."""
    if name == EMBEDDING_NAMES[1]:
        return EMBEDDING_NAMES[0]
    if name.startswith(spec.prefix):
        return "backbone." + name.removeprefix(spec.prefix)
    for theirs, ours in HEAD_NAMES:
        if name.startswith(ours):
            return theirs + name.removeprefix(ours)
    return name


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def map_state_dict(state: Mapping[str, torch.Tensor], backbone: str,
                   expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Rename a published state dict onto our model's names; refuse any missing, left-over or mis-shaped one.

    `expected` is our model's state-dict shapes. Raises ModelFileError listing every problem found.
    """
    spec = BACKBONES[backbone]
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        name = key.removeprefix("module.")
        ours = _published_to_ours(name, spec)
        if ours is None or ours not in expected:
            unexpected.append(key)
        elif ours in mapped:
            unexpected.append(f"{key} (duplicate of {source[ours]})")
        else:
            mapped[ours], source[ours] = value, key
    missing = [_ours_to_published(k, spec) for k in expected if k not in mapped]
    misshaped = [f"{source[k]} {list(v.shape)} (expected {list(expected[k])})"
                 for k, v in mapped.items() if v.shape != expected[k]]
    if missing or unexpected or misshaped:
        kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        problems = [f"{len(items)} {kind}: {_listing(items)}" for kind, items in kinds if items]
        raise ModelFileError(f"not a CLIP-Driven Universal Model checkpoint with the {backbone} backbone: "
                             + "; ".join(problems) + _backbone_hint(state, backbone))
    return mapped


def _backbone_hint(state: Mapping[str, torch.Tensor], backbone: str) -> str:
    has_swin = any("swinViT." in k for k in state)
    has_unet = any("down_tr64." in k for k in state)
    if backbone == "unet" and has_swin:
        return " (this looks like the Swin UNETR checkpoint: use --backbone swinunetr)"
    if backbone == "swinunetr" and has_unet:
        return " (this looks like the U-Net checkpoint: use --backbone unet)"
    return ""


def build_imported_model(backbone: str) -> UniversalModel:
    """An (unloaded) model of exactly the published architecture for `backbone`."""
    spec = BACKBONES[backbone]
    return UniversalModel(spec.ours, dict(spec.config), torch.zeros(NUM_CLASSES, EMBED_DIM), lpg="shared")


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise InputError(f"{name!r} is not a valid model name (use letters, digits, '-', '_', '.')")
    return name


def _manifest(name: str, backbone: str, source: Path, digest: str) -> Manifest:
    spec = BACKBONES[backbone]
    classes = default_registry().template_32()
    if [c.template_id for c in classes] != list(range(1, NUM_CLASSES + 1)):
        raise ModelFileError("the class registry does not hold the paper's 32-class template")  # pragma: no cover
    provenance = {
        "format": FORMAT,
        "source_file": source.name,
        "source_sha256": digest,
        "source_backbone": backbone,
        "imported": datetime.date.today().isoformat(),
        "authors": "Liu et al., CLIP-Driven Universal Model for Organ Segmentation and Tumor Detection, ICCV 2023",
        "class_embeddings": "CLIP ViT-B/32 text embeddings precomputed by the authors (stored in the checkpoint)",
    }
    return Manifest(name=name, backbone=spec.ours, backbone_config=dict(spec.config), classes=classes, lpg="shared",
                    text_encoder=TEXT_ENCODER, prompt_template=DEFAULT_PROMPT_TEMPLATE,
                    preprocessing=published_preprocessing(), version="1.0.0",
                    description=f"CLIP-Driven Universal Model, {spec.label} backbone, 32 classes; "
                                f"trained by the authors on 14 public CT datasets, imported from {source.name}",
                    license=LICENSE, provenance=provenance)


def import_checkpoint(path: str | Path, backbone: str, name: str | None = None,
                      output_dir: str | Path | None = None, sha256: str | None = None,
                      overwrite: bool = False) -> Path:
    """Convert a published CLIP-Driven Universal Model checkpoint into a UniversalSeg model folder.

    `backbone` is "unet" or "swinunetr"; the model is written to `output_dir` (default: the user
    model folder) as `name` (default `clip-driven-universal-<backbone>`). If `sha256` is given the
    file must have that digest. Returns the model folder. Nothing is written unless every
    parameter of the checkpoint maps onto the model with the right shape and none is missing.
    """
    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone {backbone!r} for {FORMAT}; use one of: {', '.join(BACKBONES)}")
    path = Path(path).expanduser()
    name = _check_name(name or f"{FORMAT}-{backbone}")
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    digest = sha256_file(path)
    if sha256 is not None:
        want = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", want):
            raise InputError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
        if digest != want:
            raise ModelFileError(f"{path.name}: SHA-256 mismatch (expected {want}, file has {digest}); "
                                 "the download is incomplete or a different file")
    state = read_checkpoint_state(path)
    model = build_imported_model(backbone)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    try:
        mapped = map_state_dict(state, backbone, expected)
    except ModelFileError as e:
        raise ModelFileError(f"{path.name}: {e}") from None
    model.load_state_dict(mapped, strict=True)
    directory = Path(output_dir).expanduser() if output_dir is not None else user_model_dir()
    return save_model(model.eval(), _manifest(name, backbone, path, digest), directory / name, overwrite=overwrite)
