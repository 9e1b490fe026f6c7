"""Where a model came from, as its manifest records it, and checks of that record.

Recorded in `provenance` (and so covered by the model's integrity record):
- `extended_from` (continual/extend.py): the parent's name, version, weights and integrity hashes;
- `averaged_from` (`universalseg average`, train/average.py): each averaged model, with its share;
- `refined_from` (`universalseg train`, a stage or run with `init`): the model training started from
  (before session 16 a path or a sentence: not a parent record);
- `source_file` / `source_sha256` (importers/): the checkpoint a model was converted from;
- `datasets` (the `train` command) or `training_data` (the bundled model's recipe): the data
  sources, each with a `sha256` over its files where one was recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from UniversalSegLib.errors import ModelFileError
from UniversalSegLib.store.manifest import Manifest


def parents(manifest: Manifest) -> list[dict[str, Any]]:
    """The models this one was made from, each {relation, name, version, integrity_sha256, weights_sha256}."""
    prov = manifest.provenance or {}
    found = []
    extended = prov.get("extended_from")
    if isinstance(extended, dict):
        found.append({"relation": "extended from", **extended})
    for entry in prov.get("averaged_from") or []:
        if isinstance(entry, dict):
            found.append({"relation": "averaged from", **entry})
    refined = prov.get("refined_from")
    if isinstance(refined, dict):
        found.append({"relation": "refined from", **refined})
    return found


def summary(manifest: Manifest) -> dict[str, Any]:
    """What `universalseg info` shows about a model's lineage."""
    prov = manifest.provenance or {}
    out: dict[str, Any] = {"integrity_sha256": manifest.integrity_sha256,
                           "parents": [{k: p.get(k) for k in ("relation", "name", "version", "integrity_sha256")}
                                       for p in parents(manifest)]}
    if prov.get("source_sha256"):
        out["source_checkpoint"] = {"file": prov.get("source_file"), "sha256": prov["source_sha256"]}
    data = prov.get("datasets") or prov.get("training_data") or []
    out["training_data"] = [{"name": d.get("name"), "sha256": d.get("sha256")} for d in data if isinstance(d, dict)]
    return out


@dataclass
class ParentCheck:
    """The verdict on one recorded parent: ok, differs, refused or not installed."""

    name: str
    status: str
    detail: str

    @property
    def problem(self) -> bool:
        return self.status in ("differs", "refused")


def check_parents(manifest: Manifest, directory: Path) -> list[ParentCheck]:
    """Compare each recorded parent with the installed model of that name, where there is one.

    A parent is looked up by name (user folder, then bundled); one whose version differs from the
    recorded version is a different release, not compared. Checking a parent runs every check of
    loading (closed folder, integrity record, weights hash) on the parent's own folder.

    Args:
        manifest: the child's manifest (already checked).
        directory: the child's folder (a parent's name resolving to it is not a parent).
    """
    from UniversalSegLib.store.modelfile import check_model, find_model

    results = []
    for parent in parents(manifest):
        name = str(parent.get("name") or "")
        if name == manifest.name and parent.get("version") == manifest.version:
            # a stage that names no version of its own refines its parent under the same name and version:
            # any installed model of that name and version is this release, never the earlier state
            results.append(ParentCheck(name, "not installed", "an earlier state of this release (same name and "
                                                              "version): not compared"))
            continue
        try:
            folder = find_model(name)
        except ModelFileError:
            results.append(ParentCheck(name, "not installed", "not installed here: not checked"))
            continue
        if folder.resolve() == directory.resolve():
            results.append(ParentCheck(name, "not installed", "the name is this model's own: not checked"))
            continue
        try:
            installed = check_model(folder)
        except ModelFileError as e:
            results.append(ParentCheck(name, "refused", f"installed at {folder} but refused: {e}"))
            continue
        results.append(_compare(parent, installed, folder))
    return results


def _compare(parent: dict[str, Any], installed: Manifest, folder: Path) -> ParentCheck:
    name = str(parent.get("name"))
    if parent.get("version") and parent["version"] != installed.version:
        return ParentCheck(name, "not installed", f"installed version {installed.version} is not the recorded "
                                                  f"{parent['version']}: not compared")
    want = parent.get("integrity_sha256")
    if want:
        same, what, have = want == installed.integrity_sha256, "integrity", installed.integrity_sha256
    else:  # recorded before integrity records: the weights hash is what there is
        want, have = parent.get("weights_sha256"), installed.weights_sha256
        same, what = want == have, "weights"
    if same:
        return ParentCheck(name, "ok", f"installed at {folder}; {what} hash matches ({str(want)[:12]}...)")
    return ParentCheck(name, "differs", f"installed at {folder} but its {what} hash {str(have)[:12]}... is not the "
                                        f"recorded {str(want)[:12]}...: not the model this one was made from")
