"""The JSON manifest that describes a model file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from UniversalSegLib.registry import ClassInfo, Registry
from UniversalSegLib.registry.classes import DEFAULT_PROMPT_TEMPLATE
from UniversalSegLib.text.ids import DEFAULT_ENCODER_ID

FORMAT_NAME = "universalseg-model"
FORMAT_VERSION = 1


@dataclass
class Preprocessing:
    """How images are prepared for the model, and how windows are run and blended.

    Model space (training and inference must agree; helpers in UniversalSegLib/geometry.py):
    the image reoriented to RAS (`sitk.DICOMOrient(img, "RAS")`), resampled to `spacing`
    (x, y, z in mm), HU clipped to `hu_window` and scaled to [0, 1]; arrays laid out (x, y, z)
    like nibabel's canonical image and MONAI (from SimpleITK: `GetArrayFromImage(img).transpose(2, 1, 0)`),
    so index +1 along the first axis moves toward the patient's right (verified on the sample's
    kidney labels: kidney_left has the smaller mean first-axis index).
    """

    orientation: str = "RAS"
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5])
    hu_window: list[float] = field(default_factory=lambda: [-175.0, 250.0])
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    foreground_crop: bool = True
    overlap: float = 0.5
    blend: str = "gaussian"
    threshold: float = 0.5


@dataclass
class Manifest:
    """Everything needed to rebuild, check and describe a model, besides its tensors."""

    name: str
    backbone: str
    backbone_config: dict[str, Any]
    classes: list[ClassInfo]
    lpg: str = "per_class"
    lpg_hidden: int = 512
    text_encoder: str = DEFAULT_ENCODER_ID
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    version: str = "0.1.0"
    description: str = ""
    license: str = "Apache-2.0"
    provenance: dict[str, Any] = field(default_factory=dict)
    weights_file: str = "weights.safetensors"
    weights_sha256: str = ""
    weights_dtype: str = "float32"  # float16 halves small bundled models; loading always gives float32
    format_version: int = FORMAT_VERSION
    integrity: dict[str, Any] = field(default_factory=dict)  # written by save_model; see store/integrity.py

    @property
    def integrity_sha256(self) -> str:
        """The model's integrity hash as recorded ("" before the model is saved)."""
        return str(self.integrity.get("sha256", ""))

    @property
    def class_keys(self) -> list[str]:
        return [c.key for c in self.classes]

    def registry(self) -> Registry:
        """The model's own classes as a registry (lookup by name and synonym)."""
        return Registry(self.classes, self.prompt_template)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = [c.to_dict() for c in self.classes]
        return {"format": FORMAT_NAME, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise ValueError("not a UniversalSeg model manifest")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"model format {data['format_version']} is newer than this UniversalSeg "
                             f"understands ({FORMAT_VERSION}); please update UniversalSeg")
        d = {k: v for k, v in data.items() if k != "format" and k in cls.__dataclass_fields__}
        d["classes"] = [ClassInfo.from_dict(c) for c in d["classes"]]
        d["preprocessing"] = Preprocessing(**d.get("preprocessing", {}))
        return cls(**d)
