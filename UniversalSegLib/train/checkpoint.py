"""Training checkpoints without pickle: model file + optimiser/scheduler/scaler/RNG state.

A checkpoint is a folder `checkpoints/step_00001234/` holding
    model/                       the weights in our model-file format (store.save_model)
    training_state.safetensors   every tensor of the optimiser state and the RNG states
    training_state.json          step, epoch, param-group hyper-parameters, scheduler, scaler, RNG scalars
and `checkpoints/last.json` names the newest complete one. Each folder is written under a
temporary name and renamed when complete, and `last.json` is replaced atomically afterwards, so
a run killed at any moment leaves either the previous or the new checkpoint, never half of one.
Nothing is unpickled on resume: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.io.atomic import atomic_dir, atomic_write
from UniversalSegLib.store import Manifest, load_model, save_model

LAST_FILE = "last.json"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
MODEL_DIR = "model"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class ResumeState:
    """What a resumed run needs besides the tensors restored in place."""

    step: int
    epoch: int
    extra: dict[str, Any] = field(default_factory=dict)
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None

    def restore_rng(self) -> None:
        """Set torch (CPU and CUDA), numpy and Python RNGs to their state at the checkpoint."""
        if self.rng is not None:
            _set_rng_state(*self.rng)


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors keyed 'optim/<param>/<name>', JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                              like: dict[str, Any]) -> dict[str, Any]:
    """The inverse of flatten_optimizer_state; `like` (the live optimiser's state_dict) restores tuples."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    if len(meta["param_groups"]) != len(like["param_groups"]):
        raise UniversalSegError("checkpoint optimiser has a different number of parameter groups than this run")
    groups = []
    for saved, live in zip(meta["param_groups"], like["param_groups"]):
        groups.append({k: (tuple(v) if isinstance(live.get(k), tuple) else v) for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(root: str | Path, step: int, epoch: int, model: torch.nn.Module, manifest: Manifest,
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler | None = None,
                    extra: dict[str, Any] | None = None, keep_last: int = 2, keep_every: int = 0) -> Path:
    """Write checkpoint `root/step_<step>` atomically, point `root/last.json` at it, prune old ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        save_model(model, manifest, tmp / MODEL_DIR)
        tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
        rng_tensors, rng_meta = _rng_state()
        save_file({**tensors, **rng_tensors}, str(tmp / STATE_TENSORS), metadata={"format": "universalseg-train"})
        meta = {"step": step, "epoch": epoch, "optimizer": optim_meta, "scheduler": _scheduler_state(scheduler),
                "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_meta, "extra": extra or {}}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
    _write_json_atomic(root / LAST_FILE, {"checkpoint": final.name, "step": step})
    _prune(root, final.name, keep_last, keep_every)
    return final


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    # The schedule's functions are rebuilt from the config, never read from the file.
    return {k: ([None] * len(v) if k == "lr_lambdas" else v) for k, v in scheduler.state_dict().items()}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_JSON).is_file())


def _prune(root: Path, newest: str, keep_last: int, keep_every: int) -> None:
    found = list_checkpoints(root)
    recent = {p.name for p in found[-max(1, keep_last):]} | {newest}
    for p in found:
        step = int(_STEP_DIR.match(p.name).group(1))
        if p.name not in recent and not (keep_every and step % keep_every == 0):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `last.json` names, else the newest complete one, else None."""
    root = Path(root)
    try:
        name = json.loads((root / LAST_FILE).read_text())["checkpoint"]
        if (root / name / STATE_JSON).is_file():
            return root / name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler | None = None) -> ResumeState:
    """Restore model weights, optimiser, scheduler and scaler in place from a checkpoint folder.

    The global RNG states come back in the result: call `restore_rng()` once the data stream has
    been brought to the saved step, so the model side continues exactly where it stopped.
    """
    path = Path(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as e:
        raise UniversalSegError(f"{path}: unreadable checkpoint ({e})") from None
    weights = load_model(path / MODEL_DIR).model.state_dict()  # verifies the checksum, no pickle
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UniversalSegError(f"{path}: checkpoint does not fit this run's model: {str(e)[:200]}") from None
    # load_state_dict moves each state tensor to its parameter's device and dtype itself
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"], optimizer.state_dict()))
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    rng = ({k: v for k, v in tensors.items() if k.startswith("rng/")}, meta["rng"])
    return ResumeState(step=int(meta["step"]), epoch=int(meta["epoch"]), extra=meta.get("extra", {}), rng=rng)
