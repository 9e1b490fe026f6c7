"""The `universalseg` command line. Each sub-command's work lives in the library; this file
only parses arguments, prints, and turns our errors into one line and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from UniversalSegLib.errors import UniversalSegError

EXIT_USER_ERROR = 2


def _cmd_info(args: argparse.Namespace) -> int:
    from UniversalSegLib.store import check_model, find_model
    from UniversalSegLib.store.lineage import summary

    manifest = check_model(find_model(args.model))
    # "lineage" is derived from the manifest for reading (parents, sources), not stored in it
    print(json.dumps({**manifest.to_dict(), "lineage": summary(manifest)}, indent=1))
    return 0


def _cmd_classes(args: argparse.Namespace) -> int:
    from UniversalSegLib.registry import default_registry
    from UniversalSegLib.registry.location import effective_location
    from UniversalSegLib.store import find_model, read_manifest_checked

    if args.new_classes:
        from UniversalSegLib.continual.command import check_classes_file

        return check_classes_file(args.model, args.new_classes, args.json)
    classes = default_registry().classes if args.all else read_manifest_checked(find_model(args.model)).classes
    if args.json:  # each with the location inference applies (the Slicer wizard's defaults read it)
        print(json.dumps([{**c.to_dict(), "location": effective_location(c)} for c in classes], indent=1))
        return 0
    print(f"{'key':34} {'group':7} {'name':34} parents")
    for c in classes:
        print(f"{c.key:34} {c.group:7} {c.name:34} {','.join(c.parents)}")
    return 0


def _model_rows() -> list[dict]:
    """One row per installed model folder, each fully checked; a refused one says why ("refused")."""
    from UniversalSegLib.store import scan_models

    rows, seen = [], set()
    for e in scan_models(check_weights=True):
        m = e.manifest
        row = {"name": m.name if m else e.path.name, "path": str(e.path)}
        if m:
            row.update(version=m.version, classes=len(m.classes), backbone=m.backbone, license=m.license,
                       integrity_sha256=m.integrity_sha256)
        else:
            row["refused"] = str(e.refused).removeprefix(f"{e.path}: ")
        if row["name"] in seen and "refused" not in row:  # a user model of that name comes first
            row["refused"] = "shadowed by the user model folder's model of the same name"
        seen.add(row["name"])
        rows.append(row)
    return rows


def _cmd_models(args: argparse.Namespace) -> int:
    rows = _model_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        if "refused" in r:
            print(f"{r['name']:28} REFUSED: {r['refused']}  ({r['path']})")
            continue
        print(f"{r['name']:28} v{r['version']:8} {r['classes']:4d} classes  {r['backbone']:10} "
              f"license: {r['license']}  ({r['path']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="universalseg",
                                     description="Universal CT segmentation (CLIP-driven Universal Model).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print a model's manifest (after checking it) and its lineage")
    p.add_argument("model", nargs="?", default=None, help="model name or folder (default: the bundled model)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("classes", help="list the classes of a model (or all known classes)")
    p.add_argument("--model", default=None)
    p.add_argument("--all", action="store_true", help="list the whole built-in registry")
    p.add_argument("--new-classes", default=None, metavar="PATH",
                   help="check a classes file (as `extend --classes-file` reads it) against --model: the classes "
                        "as they would be added, with their locations, or every problem")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_classes)

    p = sub.add_parser("models", help="list installed models (user folder and bundled), refused ones with the reason")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)

    for module, function in EXTRA_COMMANDS:
        getattr(importlib.import_module(module), function)(sub)
    return parser


# Sub-commands defined in other modules, as (module, function): each function adds its parser
# (with set_defaults(func=...)). Those modules import only the standard library at load time and
# the heavy parts (torch, MONAI, SimpleITK) inside their handlers, so `universalseg models` is fast.
EXTRA_COMMANDS: list[tuple[str, str]] = [
    ("UniversalSegLib.predict_cli", "register"),
    ("UniversalSegLib.cohort.command", "register_cli"),
    ("UniversalSegLib.train.cli", "register"),
    ("UniversalSegLib.continual.command", "register_cli"),
    ("UniversalSegLib.importers.command", "register_cli"),
    ("UniversalSegLib.store.command", "register_cli"),
]


def main(argv: list[str] | None = None) -> int:
    """Run one `universalseg` sub-command; returns the exit code (2 for a user error).

    Process-wide settings are made here, not on `import UniversalSegLib`: the lean MONAI import (before
    any sub-command imports MONAI) and the allocator tuning the sub-command wants.

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).
    """
    from UniversalSegLib import _lean_monai, runtime

    _lean_monai.install()
    args = build_parser().parse_args(argv)
    runtime.tune_for_command(args.command)
    try:
        return args.func(args)
    except UniversalSegError as e:
        print(f"universalseg: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `universalseg classes | head`
        return 0
    except KeyboardInterrupt:
        print("universalseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
