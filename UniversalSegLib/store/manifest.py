"""The JSON manifest that describes a model file: typed (pydantic), so a bad field is one line naming it.

`Manifest.from_dict` checks a manifest as read from a model folder (after its integrity record):
each field's type and range, unknown keys refused, e.g.
`preprocessing.spacing: must be three positive numbers (mm), got [1.5, 0]`.

`preprocessing.blend` (always "gaussian") was accepted and never read: the sliding window always
blends with its Gaussian weights. It is no longer part of the schema; manifests that carry it (the
bundled model, models saved or imported before) still load, the key dropped on reading (their
integrity records cover the file as written, so they stay valid), and new manifests omit it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from UniversalSegLib.config_file import typed, validate_section
from UniversalSegLib.registry import ClassInfo, Registry
from UniversalSegLib.registry.classes import DEFAULT_PROMPT_TEMPLATE
from UniversalSegLib.text.ids import DEFAULT_ENCODER_ID

FORMAT_NAME = "universalseg-model"
FORMAT_VERSION = 1
DEFAULT_WEIGHTS_FILE = "weights.safetensors"
_RETIRED_PREPROCESSING_KEYS = ("blend",)  # in older manifests, never read: dropped when reading

Text = typed(str, "text")
PositiveInt = typed(int, "a positive integer", gt=0)
Mapping = typed(dict[str, Any], "a mapping")


class Preprocessing(BaseModel):
    """How images are prepared for the model, and how windows are run.

    Model space (training and inference must agree; helpers in UniversalSegLib/geometry.py):
    the image reoriented to RAS (`sitk.DICOMOrient(img, "RAS")`), resampled to `spacing`
    (x, y, z in mm), HU clipped to `hu_window` and scaled to [0, 1]; arrays laid out (x, y, z)
    like nibabel's canonical image and MONAI (from SimpleITK: `GetArrayFromImage(img).transpose(2, 1, 0)`),
    so index +1 along the first axis moves toward the patient's right (verified on the sample's
    kidney labels: kidney_left has the smaller mean first-axis index).
    """

    model_config = ConfigDict(extra="forbid")

    orientation: Text = "RAS"
    spacing: typed(list[typed(float, "positive", gt=0)], "three positive numbers (mm)", min_length=3,
                   max_length=3) = Field(default_factory=lambda: [1.5, 1.5, 1.5])
    hu_window: typed(list[float], "[low, high] with low < high", min_length=2, max_length=2) = Field(
        default_factory=lambda: [-175.0, 250.0])
    patch_size: typed(list[typed(int, "positive", gt=0)], "three positive integers", min_length=3,
                      max_length=3) = Field(default_factory=lambda: [96, 96, 96])
    foreground_crop: typed(bool, "true or false") = True
    overlap: typed(float, "a number in [0, 1)", ge=0, lt=1) = 0.5
    threshold: typed(float, "a number in (0, 1)", gt=0, lt=1) = 0.5

    @field_validator("hu_window")
    @classmethod
    def _low_below_high(cls, window: list[float]) -> list[float]:
        if window[0] >= window[1]:
            raise ValueError("low must be below high")
        return window


class Manifest(BaseModel):
    """Everything needed to rebuild, check and describe a model, besides its tensors."""

    model_config = ConfigDict(extra="forbid")

    name: Text
    backbone: Text
    backbone_config: Mapping
    classes: typed(list[ClassInfo], "a list of classes")
    lpg: Text = "per_class"
    lpg_hidden: PositiveInt = 512
    text_encoder: Text = DEFAULT_ENCODER_ID
    prompt_template: Text = DEFAULT_PROMPT_TEMPLATE
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    version: Text = "0.1.0"
    description: Text = ""
    license: Text = "Apache-2.0"
    provenance: Mapping = Field(default_factory=dict)
    weights_file: Text = DEFAULT_WEIGHTS_FILE
    weights_sha256: Text = ""
    weights_dtype: typed(str, "float32 or float16", pattern=r"^float(32|16)$") = "float32"  # float16 halves
    # small bundled models; loading always gives float32
    format_version: typed(int, "a whole number", ge=0) = FORMAT_VERSION
    integrity: Mapping = Field(default_factory=dict)  # written by save_model; see store/integrity.py

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
        """The manifest as JSON data, fields in their declared order (what manifest.json holds)."""
        d = {name: ([c.to_dict() for c in self.classes] if name == "classes" else getattr(self, name))
             for name in type(self).model_fields}
        d["preprocessing"] = self.preprocessing.model_dump()
        return {"format": FORMAT_NAME, **_plain(d)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Check and read a manifest as parsed from manifest.json.

        Args:
            data: the parsed JSON object.

        Raises ValueError with one line naming the field for a manifest that is not ours, newer than
        this version understands, or has a field of the wrong type or range (or an unknown one).
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError("not a UniversalSeg model manifest")
        version = data.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(f"model format {data['format_version']} is newer than this UniversalSeg "
                             f"understands ({FORMAT_VERSION}); please update UniversalSeg")
        d = {k: v for k, v in data.items() if k != "format"}
        if isinstance(d.get("classes"), list):
            d["classes"] = [ClassInfo.from_dict(c) for c in d["classes"]]
        if isinstance(d.get("preprocessing"), dict):
            d["preprocessing"] = {k: v for k, v in d["preprocessing"].items() if k not in _RETIRED_PREPROCESSING_KEYS}
        return validate_section(cls, d, "", ValueError)


def _plain(value: Any) -> Any:
    """A copy made of dicts and lists only (what JSON round-trips), so callers may edit it freely."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
