"""The integrity record: one digest over every byte of a model that decides its output.

A manifest carries the SHA-256 of its weights file (`weights_sha256`). The record, stored in the
manifest under `integrity`, adds the SHA-256 of the manifest's canonical JSON (every field but the
record itself, `weights_sha256` included): so this one digest, the model's *integrity hash*,
covers the weights and everything the manifest says (classes and their order, preprocessing,
thresholds, architecture, text encoder, names, colours, licence, provenance). Nothing is
exempt: a field that looks cosmetic today (a class colour) may decide an output tomorrow (a
segment's colour in a DICOM SEG), and one rule is easier to trust than a list of exceptions.

The record also keeps one digest per top-level field, so a refusal can say which field changed.
It detects changes; it is not a signature: anyone can re-stamp a folder (`universalseg rehash`),
so a model from someone else is trusted by comparing its integrity hash with the one its
publisher gives (or the one a child model recorded for its parent, see store/lineage.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from UniversalSegLib.errors import ModelFileError

RECORD_KEY = "integrity"
SCHEME = "sha256-canonical-json-1"


def canonical_json(value: Any) -> bytes:
    """The one byte string a JSON value has here: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def covered(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest the record covers: all of it except the record."""
    return {k: v for k, v in manifest.items() if k != RECORD_KEY}


def make_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The integrity record of a manifest dict (as read back from JSON)."""
    body = covered(manifest)
    return {"scheme": SCHEME, "sha256": _sha256(canonical_json(body)),
            "fields": {k: _sha256(canonical_json(v)) for k, v in sorted(body.items())}}


def integrity_hash(manifest: dict[str, Any]) -> str:
    """The model's integrity hash as computed now (equal to the recorded one when intact)."""
    return _sha256(canonical_json(covered(manifest)))


class MissingRecord(ModelFileError):
    """A manifest written before integrity records existed: nothing but the weights was checked."""


def check_record(manifest: dict[str, Any], where: str) -> str:
    """Raise ModelFileError unless the manifest matches its record; returns the integrity hash.

    Args:
        manifest: the manifest as parsed from manifest.json.
        where: how to name the model in messages (its folder).
    """
    record = manifest.get(RECORD_KEY)
    if record is None:
        raise MissingRecord(f"{where}: written by an earlier UniversalSeg, its manifest has no integrity record "
                            f"(classes, preprocessing and thresholds are unchecked); if you trust this model, "
                            f"re-stamp it: universalseg rehash {where}")
    if not isinstance(record, dict) or record.get("scheme") != SCHEME or not isinstance(record.get("fields"), dict):
        raise ModelFileError(f"{where}: integrity record of an unknown form (scheme {_scheme(record)!r}); "
                             f"this UniversalSeg understands {SCHEME!r}")
    body = covered(manifest)
    fields = record["fields"]
    changed = sorted(k for k in body.keys() | fields.keys()
                     if fields.get(k) != (_sha256(canonical_json(body[k])) if k in body else None))
    if changed:
        raise ModelFileError(f"{where}: manifest changed since it was stamped: field(s) {', '.join(changed)} "
                             f"(tampered or edited); refusing to load it")
    digest = integrity_hash(manifest)
    if record.get("sha256") != digest:
        raise ModelFileError(f"{where}: manifest changed since it was stamped: its integrity record does not "
                             f"match (tampered or edited); refusing to load it")
    return digest


def _scheme(record: Any) -> Any:
    return record.get("scheme") if isinstance(record, dict) else type(record).__name__
