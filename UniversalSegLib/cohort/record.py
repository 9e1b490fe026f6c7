"""What makes a finished case reusable on a rerun: the model, the settings and the input it was made from.

Each finished case folder `OUT/<case id>/` holds `case.json` (written inside the folder before the
folder appears, so a folder without a valid record never counts as finished). A rerun reuses a
case only when its record names the same model (name, version, SHA-256 of the weights file and of
the manifest file), the same settings and the same input, and every output it lists exists.
`OUT/cohort.json` names the model and settings of the whole folder: a run with another model or
other settings is refused, so one table never mixes two models.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from UniversalSegLib.errors import InputError, ModelFileError
from UniversalSegLib.io.atomic import atomic_write

RECORD_FILE = "case.json"
COHORT_FILE = "cohort.json"
RECORD_FORMAT = "universalseg-cohort-case"
COHORT_FORMAT = "universalseg-cohort"


@dataclass(frozen=True)
class ModelIdentity:
    """A model as files on disk: two runs used the same model exactly when these agree."""

    name: str
    version: str
    weights_sha256: str
    manifest_sha256: str

    def describe(self) -> str:
        return f"{self.name} v{self.version} (weights sha256 {self.weights_sha256[:12]}...)"


def model_identity(model_dir: str | os.PathLike) -> ModelIdentity:
    """Hash the weights and manifest files of the model folder `model_dir` (see `store.find_model`).

    Args:
        model_dir: the model's folder; its files are hashed as they are, whatever integrity
            fields the manifest itself records.
    """
    from UniversalSegLib.store import read_manifest, sha256_file
    from UniversalSegLib.store.modelfile import MANIFEST_FILE

    directory = Path(model_dir)
    manifest = read_manifest(directory)
    weights = directory / manifest.weights_file
    if not weights.is_file():
        raise ModelFileError(f"{directory}: weights file {manifest.weights_file} is missing")
    return ModelIdentity(manifest.name, manifest.version, sha256_file(weights), sha256_file(directory / MANIFEST_FILE))


@dataclass(frozen=True)
class Settings:
    """The choices that change a case's outputs (the device does not: a cohort may move from CPU to GPU)."""

    classes: tuple[str, ...]  # the requested class keys, in output order
    fast: bool = False
    formats: tuple[str, ...] | None = None  # None: the CLI defaults, plus dicom-seg for DICOM input
    allow_non_ct: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def input_size(path: Path) -> int:
    """Bytes of a case's input (a series folder: of its files), to notice an input replaced under the same id."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return path.stat().st_size


def new_record(case_id: str, input_path: Path, identity: ModelIdentity, settings: Settings, seconds: float,
               outputs: dict[str, str], statistics: list[dict], notes: Sequence[str]) -> dict[str, Any]:
    """The `case.json` document of a finished case (outputs as paths relative to the case folder)."""
    return {"format": RECORD_FORMAT, "case_id": case_id, "input": str(input_path.resolve()),
            "input_bytes": input_size(input_path), "model": asdict(identity), "settings": settings.to_dict(),
            "settings_sha256": settings.digest, "seconds": round(seconds, 3), "outputs": outputs,
            "notes": list(notes), "statistics": statistics}


def write_record(folder: Path, record: dict[str, Any]) -> None:
    with atomic_write(folder / RECORD_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")


def complete_record(folder: Path, input_path: Path, identity: ModelIdentity,
                    settings: Settings) -> dict[str, Any] | None:
    """The record of `folder` when it is a finished case of this input, model and settings; else None."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        same = (record.get("format") == RECORD_FORMAT and record["model"] == asdict(identity)
                and record["settings_sha256"] == settings.digest
                and record["input"] == str(input_path.resolve()) and record["input_bytes"] == input_size(input_path))
        outputs_there = all((folder / name).exists() for name in record["outputs"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if same and outputs_there else None


def claim_output_folder(out: Path, identity: ModelIdentity, settings: Settings, write: bool) -> None:
    """Refuse an output folder holding a cohort of another model or other settings; record ours there.

    Args:
        out: the cohort's output folder.
        identity, settings: this run's model and settings.
        write: create `cohort.json` when absent (rank 0 only; the other ranks only check).
    """
    path = out / COHORT_FILE
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
            theirs, their_settings = ModelIdentity(**existing["model"]), existing["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path} is unreadable ({e}); choose another output folder") from None
        if theirs != identity:
            raise InputError(f"{out} holds a cohort segmented with model {theirs.describe()}; this run uses "
                             f"{identity.describe()}. One table never mixes two models: choose another output folder")
        if their_settings != settings.to_dict():
            ours = settings.to_dict()
            changed = "; ".join(f"{k} {their_settings.get(k)} there, {v} now" for k, v in ours.items()
                                if their_settings.get(k) != v)
            raise InputError(f"{out} holds a cohort made with other settings ({changed}); rerun with the same "
                             "settings to resume, or choose another output folder")
        return
    if write:
        out.mkdir(parents=True, exist_ok=True)
        document = {"format": COHORT_FORMAT, "model": asdict(identity), "settings": settings.to_dict(),
                    "settings_sha256": settings.digest}
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
