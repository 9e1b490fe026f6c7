"""The output folder: checked before the model runs, staged while writing, cleaned after a killed run.

`write_outputs` stages every file in a hidden `.universalseg-staging-<pid>-<random>` folder inside
the destination and moves them out only when all are written. A run that is killed leaves that
folder behind; the next run into the same destination removes it (unless its process still runs).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import SimpleITK as sitk

from UniversalSegLib.errors import InputError

STAGING_PREFIX = ".universalseg-staging-"
# A staging folder whose owner we cannot ask about (no pid in its name: written by an older version;
# or on Windows, where probing a pid is unsafe) is stale when untouched for this long.
STALE_AFTER_S = 3600.0
PUBLISH_LEFTOVER_S = 60.0
# Errors of the destination itself (not of our code): shown as one line instead of a traceback.
DESTINATION_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG",
                                                        "ENOTDIR", "EIO") if hasattr(errno, name)}
_DESTINATION_TEXT = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                     "File too large")


def check_destination(outdir: str | os.PathLike, needed_bytes: int = 0) -> None:
    """Raise InputError unless `outdir` is (or can be made) a folder we can write about `needed_bytes` into.

    Tries a real file in the nearest existing folder (permission bits do not show read-only mounts,
    ACLs or root); `needed_bytes` is checked against the disk's free space.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"output {outdir} exists and is not a folder")
    existing = outdir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"output {outdir} cannot be created: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".universalseg-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write to output {outdir}: {e.strerror or e} (in {existing})") from None
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise InputError(f"not enough disk space for output {outdir}: {free / 2**20:.0f} MiB free, the outputs "
                         f"need up to about {needed_bytes / 2**20:.0f} MiB; free some space or choose another folder")


def output_size_bound(image: sitk.Image) -> int:
    """A generous bound of what the outputs of one prediction on `image` take: one byte per voxel.

    (An uncompressed 8-bit label map; the compressed masks, seg.nrrd and statistics together stay
    well below it for the usual few dozen structures.)
    """
    size = image.GetSize()
    return int(size[0]) * int(size[1]) * int(size[2] if len(size) > 2 else 1)


def staging_folder(outdir: Path) -> Path:
    """A new, unique staging folder name inside `outdir` that names this process."""
    return outdir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_staging(outdir: Path, output_names: Iterable[str] = ()) -> list[Path]:
    """Remove what killed runs left in `outdir`; returns what was removed.

    That is staging folders, and the `.tmp-`/`.old-` siblings (io/atomic.py) of `output_names` that a
    run killed while moving its outputs into place left: those live for milliseconds, so one older
    than PUBLISH_LEFTOVER_S is stale.
    """
    removed = []
    for entry in outdir.glob(f"{STAGING_PREFIX}*"):
        if entry.is_dir() and _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    names = "|".join(re.escape(n) for n in output_names)
    if not names:
        return removed
    leftover = re.compile(rf"\.(tmp|old)-[0-9a-f]{{8}}-({names})")
    for entry in outdir.iterdir():
        if leftover.fullmatch(entry.name) and _age_s(entry) > PUBLISH_LEFTOVER_S:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _is_stale(staging: Path) -> bool:
    owner = staging.name[len(STAGING_PREFIX):].split("-")[0]
    if owner.isdigit() and os.name == "posix":
        pid = int(owner)
        if pid == os.getpid():
            return False  # ours, in use
        try:
            os.kill(pid, 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False
    return _age_s(staging) > STALE_AFTER_S


def destination_error(outdir: Path, error: BaseException) -> InputError | None:
    """The one-line InputError for a write that failed because of the destination (full, read-only, ...),
    or None when `error` is something else (a bug, which should stay a traceback)."""
    if isinstance(error, OSError) and error.errno in DESTINATION_ERRNOS:
        reason = error.strerror or str(error)
    elif isinstance(error, RuntimeError) and any(t in str(error) for t in _DESTINATION_TEXT):
        reason = next(t for t in _DESTINATION_TEXT if t in str(error))  # ITK's writers report errno as text
    else:
        return None
    return InputError(f"cannot write the outputs to {outdir}: {reason}; nothing was written")
