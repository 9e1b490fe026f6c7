"""Save, find, verify and load model files.

A model is a folder `<name>/` holding `manifest.json` and `weights.safetensors`. Before reading
any tensor, loading checks that the folder is closed (store/folder.py), that the manifest matches
its integrity record (store/integrity.py) and the weights their SHA-256, and that the weights are
a well-formed safetensors file; it never unpickles anything. docs/models.md says what is covered.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from UniversalSegLib.errors import ModelFileError
from UniversalSegLib.io.atomic import atomic_dir, atomic_write
from UniversalSegLib.store.folder import check_plain_name, inside_path, open_inside
from UniversalSegLib.store.integrity import RECORD_KEY, check_record, covered, make_record
from UniversalSegLib.store.manifest import DEFAULT_WEIGHTS_FILE, FORMAT_NAME, FORMAT_VERSION, Manifest

if TYPE_CHECKING:  # torch and the model load only when a model is built: listing models stays fast
    import torch

    from UniversalSegLib.model import UniversalModel

DEFAULT_MODEL = "universalseg-demo"
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "resources" / "models"
MANIFEST_FILE = "manifest.json"


def user_model_dir() -> Path:
    """Where trained and extended models go: $UNIVERSALSEG_MODELS or ~/.universalseg/models."""
    env = os.environ.get("UNIVERSALSEG_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".universalseg" / "models"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A model ready to run, with its manifest and the folder it came from."""

    model: UniversalModel
    manifest: Manifest
    path: Path


def build_model(manifest: Manifest, class_embeddings: torch.Tensor) -> UniversalModel:
    """An untrained model of the shape a manifest describes."""
    from UniversalSegLib.model import UniversalModel

    return UniversalModel(manifest.backbone, manifest.backbone_config, class_embeddings,
                          lpg=manifest.lpg, lpg_hidden=manifest.lpg_hidden)


def save_model(model: UniversalModel, manifest: Manifest, directory: str | Path, overwrite: bool = False,
               weights_dtype: str = "float32") -> Path:
    """Write a model folder atomically (temporary folder, then rename); returns its path.

    The manifest gets the weights' SHA-256 and its integrity record (store/integrity.py).

    Args:
        model: the network to store (its state dict goes to safetensors).
        manifest: what the model is (classes, backbone, preprocessing, provenance).
        directory: the model folder to create.
        overwrite: replace an existing folder (default: refuse).
        weights_dtype: "float16" stores floating-point tensors in half precision (bundled demo
            models); the default "float32" round-trips bit for bit.
    """
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise ModelFileError(f"{directory} already exists; choose another name or remove it")
    check_plain_name(manifest.weights_file, "weights_file", str(directory))
    with atomic_dir(directory) as tmp:  # a reader sees the old folder or the whole new one
        dtype = getattr(torch, weights_dtype)
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in model.state_dict().items()}
        manifest.weights_dtype = weights_dtype
        weights = tmp / manifest.weights_file
        save_file(tensors, str(weights), metadata={"format": "universalseg-model"})
        manifest.weights_sha256 = sha256_file(weights)
        manifest.integrity = {}
        stamped = stamp(manifest.to_dict())
        manifest.integrity = stamped[RECORD_KEY]
        (tmp / MANIFEST_FILE).write_text(manifest_text(stamped), encoding="utf-8")
    return directory


def stamp(manifest: dict) -> dict:
    """`manifest` with a fresh integrity record (computed on its JSON round trip, as readers see it)."""
    data = json.loads(json.dumps(covered(manifest)))
    return {**data, RECORD_KEY: make_record(data)}


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


@dataclass
class ModelEntry:
    """An installed model folder as listed: its manifest when it passed the checks, else why not."""

    path: Path
    manifest: Manifest | None
    refused: str | None = None


def _model_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file() and not p.name.startswith("."))


def scan_models(check_weights: bool = False) -> list[ModelEntry]:
    """Every installed model folder (the user's folder first, then the bundled ones), refused ones included.

    Args:
        check_weights: also hash and check each weights file (what loading checks), not only the manifest.
    """
    entries = []
    for root in (user_model_dir(), BUNDLED_DIR):
        for d in _model_dirs(root):
            try:
                entries.append(ModelEntry(d, check_model(d) if check_weights else read_manifest(d)))
            except ModelFileError as e:
                entries.append(ModelEntry(d, None, str(e)))
    return entries


def list_models() -> list[tuple[Path, Manifest]]:
    """Every installed model whose manifest passes its checks, as (folder, manifest): the user's folder
    first, then the bundled ones."""
    return [(e.path, e.manifest) for e in scan_models() if e.manifest is not None]


def find_model(name_or_path: str | Path | None = None) -> Path:
    """Resolve a model folder from a path or a name (user folder first, then bundled)."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.name == MANIFEST_FILE and (path.is_file() or path.is_symlink()):
        path = path.parent
    if (path / MANIFEST_FILE).is_file() or (path / MANIFEST_FILE).is_symlink():
        return path
    for root in (user_model_dir(), BUNDLED_DIR):
        if (root / name / MANIFEST_FILE).is_file() or (root / name / MANIFEST_FILE).is_symlink():
            return root / name
    known = ", ".join(m.name for _, m in list_models()) or "none"
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder without a model manifest ({MANIFEST_FILE}); give a model folder or "
                             f"an installed model's name (installed: {known})")
    if path.exists():
        raise ModelFileError(f"{path} is a file, not a model folder; give the folder that holds {MANIFEST_FILE} and "
                             f"the weights, or an installed model's name (installed: {known})")
    raise ModelFileError(f"model {name!r} not found (installed: {known})")


MAX_MANIFEST_BYTES = 64 << 20  # a 10,000-class manifest is ~6 MB


def read_manifest_dict(directory: Path) -> dict:
    """manifest.json of a model folder as parsed JSON, checked only for being one (no integrity check)."""
    where = str(directory)
    with open_inside(directory, MANIFEST_FILE) as f:
        if os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES:
            raise ModelFileError(f"{where}: manifest.json is larger than {MAX_MANIFEST_BYTES >> 20} MB; "
                                 "not a model manifest")
        text = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise ModelFileError(f"{where}: unreadable model manifest ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{where}: manifest.json is not a UniversalSeg model manifest")
    if not isinstance(data.get("format_version", 0), int) or data.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{where}: model format {data.get('format_version')!r} is newer than this UniversalSeg "
                             f"understands ({FORMAT_VERSION}); please update UniversalSeg")
    check_plain_name(data.get("weights_file", DEFAULT_WEIGHTS_FILE), "weights_file", where)
    return data


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def read_manifest(directory: Path) -> Manifest:
    """A model folder's manifest, after checking it against its integrity record (weights not hashed).

    Raises ModelFileError for a manifest that is unreadable, changed since it was stamped, names
    files outside the folder, or has no record (written by an earlier version).
    """
    data = read_manifest_dict(directory)
    check_record(data, str(directory))
    try:
        return Manifest.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{directory}: unreadable model manifest ({e})") from None


def check_model(directory: Path) -> Manifest:
    """The manifest, after every check loading makes before reading tensors: closed folder,
    integrity record, weights SHA-256 and safetensors header. Opens no file outside `directory`."""
    manifest = read_manifest(directory)
    check_weights(directory, manifest)
    return manifest


read_manifest_checked = check_model  # the name callers used before integrity records


def check_weights(directory: Path, manifest: Manifest) -> Path:
    """The weights file's real path, once it matches the manifest's SHA-256 and is a sane safetensors file."""
    name = manifest.weights_file
    real, digest, head, size = _hash_weights(directory, name)
    if digest != manifest.weights_sha256:
        raise ModelFileError(f"{directory}: weights changed since the model was stamped: {name} does not match "
                             f"its recorded SHA-256 (expected {manifest.weights_sha256[:12]}..., file has "
                             f"{digest[:12]}...); the file is corrupted or was replaced")
    check_safetensors(real, head, size, f"{directory}: {name}")
    return real


def _hash_weights(directory: Path, name: str) -> tuple[Path, str, bytes, int]:
    """(real path, SHA-256, first 8 bytes, size) of a folder's weights file."""
    real = inside_path(directory, name)
    with open_inside(directory, name) as f:
        size, head = os.fstat(f.fileno()).st_size, f.read(8)
        digest = hashlib.sha256(head)
        while block := f.read(1 << 20):
            digest.update(block)
    return real, digest.hexdigest(), head, size


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header


def check_safetensors(path: Path, head: bytes, size: int, where: str) -> None:
    """Refuse a weights file that is not a well-formed safetensors file, before any tensor is read.

    The header length (the first 8 bytes) is checked against the file size first, so a pickle or
    a forged length (2^40) fails in one line instead of asking for terabytes; then the safetensors
    library parses and validates the header (dtypes, shapes, offsets inside the file, no overlap).
    """
    from safetensors import SafetensorError, safe_open

    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
        raise ModelFileError(f"{where} is not a safetensors file (header length {length} for a file of "
                             f"{size} bytes)")
    try:
        with safe_open(str(path), framework="numpy") as f:  # header only: numpy needs no torch
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{where} is not a valid safetensors file ({str(e).splitlines()[0][:200]})") from None


READ_WINDOW_BYTES = 64 << 20


def read_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file, in memory of its own (copies, not views of the file).

    The safetensors library reads the file (validated header, never executes code). Its tensors
    are views of a memory map of the whole file, and each page they touch stays resident while
    the file is open (`safetensors.torch.load_file` keeps it open as long as any tensor lives, so
    converting or folding weights held them twice). Here each tensor is copied out and the file
    is reopened every READ_WINDOW_BYTES, so at most that much of the map is resident besides the
    copies (benchmarks/bench_model_load.py measures the peak).
    """
    from safetensors import safe_open

    tensors: dict = {}
    handle, mapped = None, 0
    with safe_open(str(path), framework="pt") as index:
        names = list(index.keys())
    for name in names:
        if handle is None or mapped > READ_WINDOW_BYTES:
            handle, mapped = safe_open(str(path), framework="pt"), 0
        view = handle.get_tensor(name)
        tensors[name] = view.clone()
        mapped += view.numel() * view.element_size()
        del view
    del handle
    return tensors


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Find, verify (closed folder, integrity record, SHA-256, safetensors header) and load a model.

    Args:
        name_or_path: an installed model's name (your model folder first, then the bundled ones) or a
            model folder; default: the bundled model.
        device: where the weights go ("cpu", "cuda", "cuda:N" or a torch.device).

    Raises ModelFileError on any corruption, tampering or file outside the model folder.
    """
    from safetensors import SafetensorError

    directory = find_model(name_or_path)
    manifest = read_manifest(directory)
    weights = check_weights(directory, manifest)
    try:
        tensors = read_tensors(weights)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ModelFileError(f"{weights}: unreadable weights ({str(e).splitlines()[0][:200]})") from None
    for key, value in tensors.items():  # one tensor at a time: half-precision files never exist twice
        if value.is_floating_point():
            tensors[key] = value.float()
    if "class_embeddings" not in tensors or tensors["class_embeddings"].shape[0] != len(manifest.classes):
        raise ModelFileError(f"{weights}: class embeddings do not match the manifest's {len(manifest.classes)} classes")
    model = _build_unallocated(manifest, tensors["class_embeddings"])
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelFileError(f"{weights}: weights do not fit the manifest's architecture "
                             f"({_state_dict_problem(e)})") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ModelFileError(f"{weights}: weights do not cover every tensor of the manifest's architecture")
    return LoadedModel(model.to(device).eval(), manifest, directory)


def _state_dict_problem(error: RuntimeError) -> str:
    """torch's load_state_dict error (a heading, then one tab-indented line per problem) in one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    problems = lines[1:] or lines or [type(error).__name__]
    first = problems[0].replace("torch.Size(", "(")
    first = first if len(first) <= 240 else first[:237] + "..."
    return f"{len(problems)} problems, e.g. {first}" if len(problems) > 1 else first


def _build_unallocated(manifest: Manifest, class_embeddings: torch.Tensor) -> UniversalModel:
    """The manifest's architecture, to be handed the loaded tensors themselves (`assign=True`).

    Built on the meta device, so no randomly initialised copy of the weights ever exists (a
    256-class model is ~0.5 GB: a third of loading's peak). Some networks read values while they
    are built (MONAI 1.6's SwinTransformer calls `.item()` on a linspace), which the meta device
    cannot do: those are built on the CPU instead and their random weights are replaced at once.
    """
    import torch

    try:
        with torch.device("meta"):
            return build_model(manifest, class_embeddings.to("meta"))
    except (RuntimeError, NotImplementedError):
        return build_model(manifest, class_embeddings)


def create_model(name: str, class_keys: list[str], backbone: str = "segresnet", backbone_config: dict | None = None,
                 text_encoder=None, registry=None, **manifest_fields) -> tuple[UniversalModel, Manifest]:
    """A fresh (untrained) model for registry classes, with their prompts embedded once.

    Args:
        name: the model's name (its folder name when saved).
        class_keys: registry keys, names or synonyms of the classes, in output order.
        backbone: a registered backbone ("segresnet", "swinunetr", "unet").
        backbone_config: keyword arguments of the backbone's network.
        text_encoder: the prompt encoder (default: the offline MiniLM).
        registry: the class registry (default: the bundled one).
        manifest_fields: further `Manifest` fields (preprocessing, lpg_hidden, ...).
    """
    from UniversalSegLib.registry import default_registry
    from UniversalSegLib.text import embed_prompts, get_text_encoder

    registry = registry or default_registry()
    classes = [registry.resolve(k) for k in class_keys]
    encoder = text_encoder or get_text_encoder()
    manifest = Manifest(name=name, backbone=backbone, backbone_config=dict(backbone_config or {}), classes=classes,
                        text_encoder=encoder.encoder_id, prompt_template=registry.prompt_template, **manifest_fields)
    embeddings = embed_prompts(encoder, [c.prompt for c in classes], manifest.prompt_template)
    return build_model(manifest, embeddings), manifest


def rehash_model(name_or_path: str | Path, new_weights: bool = False) -> tuple[Path, str, str]:
    """Re-stamp a model the user trusts: write its integrity record for the files as they are now.

    For models written before integrity records, or edited on purpose. The manifest must still be
    a readable model manifest naming a weights file inside the folder, and the weights a valid
    safetensors file. Returns (folder, integrity hash, what changed, in words).

    Args:
        name_or_path: model name or folder.
        new_weights: accept weights that differ from the manifest's recorded SHA-256 (else refused:
            that is what a corrupted or replaced weights file looks like).
    """
    directory = find_model(name_or_path)
    data = read_manifest_dict(directory)
    try:
        Manifest.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{directory}: unreadable model manifest ({e}); not re-stamped") from None
    name = data.get("weights_file", DEFAULT_WEIGHTS_FILE)
    real, weights_sha, head, size = _hash_weights(directory, name)
    check_safetensors(real, head, size, f"{directory}: {name}")
    recorded = data.get("weights_sha256", "")
    if recorded and recorded != weights_sha and not new_weights:
        raise ModelFileError(f"{directory}: {name} does not match the SHA-256 in its manifest (the file is "
                             f"corrupted or was replaced); not re-stamped. If these new weights are intended: "
                             f"universalseg rehash --new-weights {directory}")
    before = _record_state(data, directory)
    data["weights_sha256"] = weights_sha
    stamped = stamp(data)
    try:
        with atomic_write(directory / MANIFEST_FILE) as tmp:
            tmp.write_text(manifest_text(stamped), encoding="utf-8")
    except OSError as e:  # e.g. a bundled model in a read-only installation
        raise ModelFileError(f"{directory}: cannot write its manifest ({e.strerror}); not re-stamped") from None
    after = stamped[RECORD_KEY]["sha256"]
    return directory, after, before


def _record_state(data: dict, directory: Path) -> str:
    try:
        check_record(data, str(directory))
    except ModelFileError as e:
        if RECORD_KEY not in data:
            return "it had no integrity record"
        return f"its old record did not match ({str(e).split(': ', 1)[-1]})"
    return "its old record matched already"
