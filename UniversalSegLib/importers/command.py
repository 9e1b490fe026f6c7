"""`universalseg import-checkpoint`: the CLI face of the importers (argument parsing and printing only)."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("clip-driven-universal",)
PUBLISHED_BACKBONES = ("unet", "swinunetr")


def _cmd_import(args: argparse.Namespace) -> int:
    from UniversalSegLib.importers.clip_driven_universal import LICENSE, import_checkpoint

    name, output_dir = args.name, args.output_dir
    if name and ("/" in name or "\\" in name):  # `-o some/folder/name`: a path, not just a name
        output_dir, name = str(Path(name).expanduser().parent), Path(name).name
    folder = import_checkpoint(args.path, args.backbone, name=name, output_dir=output_dir, sha256=args.sha256,
                               overwrite=args.force)
    print(f"imported {args.path} -> {folder}")
    print(f"model name: {folder.name}   license: {LICENSE}")
    print(f"run it with: universalseg predict CT.nii.gz -o OUTDIR --model {folder.name}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add the `import-checkpoint` sub-command (hooked into cli.EXTRA_COMMANDS)."""
    p = sub.add_parser("import-checkpoint",
                       help="convert a published model checkpoint into a UniversalSeg model (weights only)",
                       description="Read a published checkpoint (tensors only, nothing else is unpickled), map "
                                   "its parameters onto UniversalSeg's model and write a model file.")
    p.add_argument("path", help="the downloaded checkpoint, e.g. clip_driven_universal_unet.pth")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="checkpoint family (default: %(default)s)")
    p.add_argument("--backbone", choices=PUBLISHED_BACKBONES, required=True, help="which published checkpoint")
    p.add_argument("-o", "--output", dest="name", default=None,
                   help="model name, or a folder path (default: clip-driven-universal-<backbone>)")
    p.add_argument("--output-dir", default=None, help="where to write the model (default: the user model folder)")
    p.add_argument("--sha256", default=None, help="refuse the file unless it has this SHA-256 digest")
    p.add_argument("--force", action="store_true", help="replace an existing model of the same name")
    p.set_defaults(func=_cmd_import)
