"""`universalseg verify` and `universalseg rehash`: the CLI face of model integrity (parsing and printing only)."""

from __future__ import annotations

import argparse

EXIT_LINEAGE_DIFFERS = 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from UniversalSegLib.store import check_model, find_model
    from UniversalSegLib.store.lineage import check_parents, summary

    directory = find_model(args.model)
    manifest = check_model(directory)  # raises (one line, exit 2) when anything is refused
    print(f"{directory}: intact; integrity sha256 {manifest.integrity_sha256}")
    print(f"  {manifest.name} v{manifest.version}, {len(manifest.classes)} classes; {manifest.weights_file} "
          f"sha256 {manifest.weights_sha256}; the record covers the weights and every manifest field")
    checks = check_parents(manifest, directory)
    for check in checks:
        print(f"  parent {check.name}: {check.status}: {check.detail}")
    info = summary(manifest)
    if "source_checkpoint" in info:
        src = info["source_checkpoint"]
        print(f"  imported from {src['file']} (sha256 {src['sha256']})")
    for data in info["training_data"]:
        print(f"  trained on {data['name']}: " + (f"sha256 {data['sha256']}" if data["sha256"] else "no hash recorded"))
    if any(c.problem for c in checks):
        print("  lineage: a recorded parent differs from the installed model of that name")
        return EXIT_LINEAGE_DIFFERS
    return 0


def _cmd_rehash(args: argparse.Namespace) -> int:
    from UniversalSegLib.store import rehash_model

    directory, digest, before = rehash_model(args.model, new_weights=args.new_weights)
    print(f"{directory}: stamped ({before}); integrity sha256 {digest}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add the `verify` and `rehash` sub-commands (hooked into cli.EXTRA_COMMANDS)."""
    p = sub.add_parser("verify", help="check a model (integrity record, weights, closed folder) and its lineage",
                       description="Check everything loading checks, without loading: the manifest against its "
                                   "integrity record, the weights against their SHA-256, the safetensors header, "
                                   "and that the folder names nothing outside it. Then compare each recorded parent "
                                   "model with the installed one of that name. Exit 0: intact; 1: intact, but a "
                                   "recorded parent differs; 2: refused.")
    p.add_argument("model", nargs="?", default=None, help="model name or folder (default: the bundled model)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("rehash", help="re-stamp a model you trust (writes its integrity record)",
                       description="Write a new integrity record for a model folder as it is now: for models "
                                   "written by earlier versions, or a manifest you edited on purpose. Only for "
                                   "models you trust: the record then vouches for whatever the files say.")
    p.add_argument("model", help="model name or folder")
    p.add_argument("--new-weights", action="store_true",
                   help="accept a weights file that differs from the SHA-256 in the manifest")
    p.set_defaults(func=_cmd_rehash)
