"""`universalseg extend`: the command-line face of `extend_model` (imports nothing heavy until run).

With --progress-json, stdout carries one JSON object per line for a GUI (the Slicer wizard):
    {"progress": 0.42, "message": "..."}   {"loss": 0.81, "step": 12}
    {"done": true, "model": "<folder>", "report": {...}}     or, on failure, {"done": false, "error": "..."}
SIGTERM cancels cleanly (no model written); the exit code is then 3.
Each class may carry its own prompt, group, parents, colour, synonyms and location through
--classes-file (what the wizard sends); --group / --parent / --synonym fill in what a class leaves unset.
A class's location defaults to the registry's for a key it knows; for any other key, to trunk-only
exactly when every parent is, and with no parent to `trunk: false` (it may lie in an arm or leg), so
that inference never removes or blanks a user's structure in a limb on a guess.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

EXIT_CANCELLED = 3


def _with_defaults(spec: dict, group: str | None, parents: list[str], synonyms: list[str]) -> dict:
    """Fill the fields a class leaves unset from the command-wide --group / --parent / --synonym."""
    spec = dict(spec)
    for name, value in (("group", group), ("parents", list(parents)), ("synonyms", list(synonyms))):
        if value and spec.get(name) is None:
            spec[name] = value
    return spec


def parse_new_class(text: str, group: str | None, parents: list[str], synonyms: list[str]) -> dict:
    """KEY or KEY:"Display name" -> the dict form `extend_model` accepts."""
    key, _, name = text.partition(":")
    spec: dict = {"key": key.strip()}
    if name.strip():
        spec["name"] = name.strip().strip('"')
    return _with_defaults(spec, group, parents, synonyms)


def load_classes_file(path: str | Path) -> list[dict]:
    """The new classes of a JSON/YAML file: a list (or {classes: [...]}) of objects {key, name, prompt,
    group, parents, colour, synonyms, location} or bare keys. Fields are checked later, by `make_new_classes`."""
    from UniversalSegLib.config_file import parse_config_text
    from UniversalSegLib.errors import InputError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read classes file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = parse_config_text(text, path.suffix)
    except Exception as e:  # noqa: BLE001 - any parse error is a bad file, said in one line
        raise InputError(f"cannot parse classes file {path}: {' '.join(str(e).split())}") from None
    entries = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise InputError(f"classes file {path}: expected a non-empty list of classes (or a 'classes:' list)")
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, (dict, str)):
            raise InputError(f"classes file {path}: entry {i} must be an object with a key, not {entry!r}")
    return [{"key": e} if isinstance(e, str) else e for e in entries]


def new_class_specs(args: argparse.Namespace) -> list[dict]:
    """The classes to add from --classes-file and --new-class, command-wide defaults filled in."""
    from UniversalSegLib.errors import InputError

    if not args.new_class and not args.classes_file:
        raise InputError("give the classes to add: --new-class KEY (repeatable) and/or --classes-file PATH")
    defaults = (args.group, args.parent or [], args.synonym or [])
    from_file = load_classes_file(args.classes_file) if args.classes_file else []
    return ([_with_defaults(spec, *defaults) for spec in from_file]
            + [parse_new_class(text, *defaults) for text in args.new_class or []])


def check_classes_file(model: str | None, path: str | Path, as_json: bool) -> int:
    """`universalseg classes --new-classes PATH`: the classes of a classes file as `extend` would add
    them to `model` (each with its location), and every problem with them, before any data or training.

    With `as_json`, prints {"classes": [...], "problems": [...]} and returns 0 (a report, as the Slicer
    wizard reads it); else prints the classes and returns 0, or each problem on stderr and returns 2.

    Args:
        model: the base model's name or folder (None: the bundled model).
        path: the classes file (JSON/YAML, as --classes-file reads it).
        as_json: print JSON.
    """
    import json

    from UniversalSegLib.continual.classes import check_new_classes
    from UniversalSegLib.store import find_model, read_manifest_checked

    manifest = read_manifest_checked(find_model(model))
    classes, problems = check_new_classes(load_classes_file(path), manifest)
    if as_json:
        print(json.dumps({"classes": [] if problems else [c.to_dict() for c in classes], "problems": problems},
                         indent=1))
        return 0
    for problem in problems:
        print(f"universalseg: error: {problem}", file=sys.stderr)
    for c in [] if problems else classes:
        print(f"{c.key:34} {c.group:7} {c.name:34} {','.join(c.parents):20} {json.dumps(c.location)}")
    return 2 if problems else 0


def _cmd_extend(args: argparse.Namespace) -> int:
    cancel = threading.Event()
    if threading.current_thread() is threading.main_thread():  # signals can only be set there
        previous = signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    else:
        previous = None
    try:
        return _run(args, cancel)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, cancel: threading.Event) -> int:
    from UniversalSegLib.continual import ExtensionCancelled, extend_model
    from UniversalSegLib.errors import UniversalSegError
    from UniversalSegLib.progress import json_line, json_progress, stage_lines

    retention = [] if args.retention_image == ["none"] else (args.retention_image or ["sample"])
    if args.progress_json:
        progress = json_progress
        on_step = lambda s, loss: json_line(loss=round(loss, 5), step=s)  # noqa: E731
    else:
        progress, on_step = stage_lines(), None
    try:
        report = extend_model(
            args.model, new_class_specs(args), args.data, args.output, train=args.train,
            warmup_heads_steps=args.warmup_steps, steps=args.steps, epochs=args.epochs,
            time_budget_s=args.time_budget, lr=args.lr, init=args.init,
            holdout_fraction=args.holdout_fraction, batch_size=args.batch_size, patch_size=args.patch_size,
            naive_baseline=not args.no_naive_baseline, retention_images=retention, device=args.device,
            seed=args.seed, overwrite=args.overwrite, progress=progress, on_step=on_step, cancel=cancel)
    except ExtensionCancelled as e:
        if args.progress_json:
            json_line(done=False, cancelled=True, error=str(e))
        print(f"universalseg: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except UniversalSegError as e:
        if args.progress_json:
            json_line(done=False, error=str(e))
        raise
    if args.report:
        report.write(args.report)
    if args.progress_json:
        json_line(done=True, model=report.model_path, report=report.to_dict())
    else:
        print(report.summary())
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add the `extend` sub-command (see cli.EXTRA_COMMANDS)."""
    p = sub.add_parser("extend", help="add new classes to a model from new data, without forgetting the old ones",
                       description="Add classes to a trained model using only new image + mask pairs. Old classes "
                                   "are protected by the base model's own predictions (pseudo-labels).")
    p.add_argument("--model", default=None, help="base model name or folder (default: the bundled model)")
    p.add_argument("--data", required=True, help="dataset spec (YAML/JSON), a folder with images/ + masks/<class>/, "
                                                 "or a one-case folder with one image and masks/<class>.nii.gz")
    p.add_argument("--new-class", action="append", metavar='KEY[:"display name"]',
                   help="a class to add (repeat for several); its masks are masks/<KEY>...; other fields "
                        "(location among them) through --classes-file")
    p.add_argument("--classes-file", default=None, metavar="PATH",
                   help="JSON/YAML list of classes to add, each with its own key, name, prompt, group, parents, "
                        "colour, synonyms and location {trunk: true|false, lateral: [lo, hi], caudal_to: [keys]} "
                        "(with or instead of --new-class). Location defaults to the registry's for a known key; "
                        "else trunk-only when every parent is, and trunk: false without parents (a class of "
                        "unknown place is never removed from an arm or leg)")
    p.add_argument("-o", "--output", required=True, help="new model name (user model folder) or folder path")
    p.add_argument("--group", default=None,
                   help="group (organ, vessel, tumour, bone, ...) of the new classes that set none of their own")
    p.add_argument("--parent", action="append",
                   help="host structure(s) of the new classes that set none of their own (repeatable)")
    p.add_argument("--synonym", action="append",
                   help="synonym(s) of the new classes that set none of their own (repeatable)")
    p.add_argument("--train", default="heads+decoder", choices=("heads", "heads+decoder", "all"))
    p.add_argument("--init", default="auto", choices=("auto", "similar", "fresh"))
    p.add_argument("--steps", type=int, default=None, help="main training steps (default 60)")
    p.add_argument("--epochs", type=float, default=None, help="main training length in passes over the data")
    p.add_argument("--warmup-steps", type=int, default=100, help="steps of new-heads-only warm-up")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="training time limit in seconds")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch-size", type=int, nargs=3, default=None, help="default: the model's patch size")
    p.add_argument("--holdout-fraction", type=float, default=0.3, help="share of the data held out for the report")
    p.add_argument("--retention-image", action="append", metavar="PATH",
                   help="CT to measure old-class retention on (repeatable; default: the bundled sample; 'none')")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model of that name")
    p.add_argument("--progress-json", action="store_true", help="print JSON lines (progress, loss, result)")
    p.add_argument("--report", default=None, metavar="PATH", help="also write the JSON report here")
    p.add_argument("--no-naive-baseline", action="store_true",
                   help="skip the comparison run without pseudo-labels (about halves the time)")
    p.set_defaults(func=_cmd_extend)
