"""Weight averaging: a refined model interpolated with the model it was refined from.

    universalseg average REFINED PARENT --parent-weight 0.3 --version 0.4.1 --out DIR

Writes `(1 - w) * REFINED + w * PARENT` as a new model folder, with a `provenance.stages` entry and
`provenance.averaged_from` (store/lineage.py) saying so. Both models must have the same architecture
and classes: a refinement and its starting point do, and they lie in one basin of the loss, so their
average is a model too (WiSE-FT, Wortsman et al. 2022: interpolating a fine-tuned model with its
start keeps much of what each knows, and helps under distribution shift). A config's stage
`average: {parent: STAGE, parent_weight: w}` runs the same function (train/run.py).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from UniversalSegLib.errors import UniversalSegError


def average_models(refined: str | Path, parent: str | Path, parent_weight: float, version: str | None,
                   out: str | Path, weights_dtype: str = "float16", stage: str = "average") -> Path:
    """Write `(1 - parent_weight) x refined + parent_weight x parent` to `out` (replaced if it exists).

    Args:
        refined: the refined model's folder.
        parent: the folder of the model it was refined from.
        parent_weight: the parent's share, 0 to 1.
        version: the new model's version (None: the refined model's).
        out: the new model's folder.
        weights_dtype: the stored weights (float16, like the bundled model, or float32).
        stage: the name recorded in `provenance.stages`.
    """
    from UniversalSegLib.store import load_model, save_model

    if not 0.0 <= parent_weight <= 1.0:
        raise UniversalSegError(f"--parent-weight must lie in [0, 1], not {parent_weight}")
    new, old = load_model(refined), load_model(parent)
    manifest = new.manifest
    if manifest.class_keys != old.manifest.class_keys or manifest.backbone_config != old.manifest.backbone_config:
        raise UniversalSegError(f"{refined} and {parent} differ in classes or architecture: they cannot be averaged")
    theirs = old.model.state_dict()
    mixed = {k: (1 - parent_weight) * v + parent_weight * theirs[k] if v.is_floating_point() else v
             for k, v in new.model.state_dict().items()}
    new.model.load_state_dict(mixed)
    version = version or manifest.version
    provenance = manifest.provenance
    provenance["stages"] = [*provenance.get("stages", []), {
        "stage": stage, "version": version, "refined": f"{refined} ({manifest.version})",
        "parent": f"{parent} ({old.manifest.version})", "parent_weight": parent_weight}]
    provenance["averaged_from"] = [  # store/lineage.py: `universalseg verify` compares them with installed models
        {"name": m.manifest.name, "version": m.manifest.version, "integrity_sha256": m.manifest.integrity_sha256,
         "weights_sha256": m.manifest.weights_sha256, "weight": w}
        for m, w in ((new, 1 - parent_weight), (old, parent_weight))]
    provenance["created"] = datetime.date.today().isoformat()
    manifest.version = version
    return save_model(new.model, manifest, out, overwrite=True, weights_dtype=weights_dtype)
