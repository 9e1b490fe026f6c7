"""Interpolate the weights of a refined model with those of the model it was refined from.

    python training/default_model/average.py REFINED PARENT --parent-weight 0.3 --version 0.4.1 --out DIR

Writes `(1 - w) * REFINED + w * PARENT` as a new model folder (float16, like the bundled model),
with a `provenance.stages` entry saying so. Both models must have the same architecture and
classes: a refinement and its starting point do, and they lie in one basin of the loss, so their
average is a model too (WiSE-FT, Wortsman et al. 2022: interpolating a fine-tuned model with its
start keeps much of what each knows, and helps under distribution shift). v0.4.1 is 0.7 x stage 2f
+ 0.3 x stage 2d: 2f held the thin slabs, 2d found more of the liver under a chest.
"""

from __future__ import annotations

import argparse
import datetime
import sys

from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.store import load_model, save_model


def average(refined: str, parent: str, parent_weight: float, version: str, out: str) -> None:
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
    provenance = manifest.provenance
    provenance["stages"] = [*provenance.get("stages", []), {
        "stage": "average", "version": version, "refined": f"{refined} ({manifest.version})",
        "parent": f"{parent} ({old.manifest.version})", "parent_weight": parent_weight}]
    provenance["averaged_from"] = [  # store/lineage.py: `universalseg verify` compares them with installed models
        {"name": m.manifest.name, "version": m.manifest.version, "integrity_sha256": m.manifest.integrity_sha256,
         "weights_sha256": m.manifest.weights_sha256, "weight": w}
        for m, w in ((new, 1 - parent_weight), (old, parent_weight))]
    provenance["created"] = datetime.date.today().isoformat()
    manifest.version = version
    save_model(new.model, manifest, out, overwrite=True, weights_dtype="float16")
    print(f"{out}: {1 - parent_weight:g} x {refined} + {parent_weight:g} x {parent}, version {version}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("refined", help="the refined model's folder")
    parser.add_argument("parent", help="the folder of the model it was refined from")
    parser.add_argument("--parent-weight", type=float, required=True, help="the parent's share, 0 to 1")
    parser.add_argument("--version", required=True, help="the new model's version")
    parser.add_argument("--out", required=True, help="the new model's folder (replaced if it exists)")
    args = parser.parse_args()
    try:
        average(args.refined, args.parent, args.parent_weight, args.version, args.out)
    except UniversalSegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
