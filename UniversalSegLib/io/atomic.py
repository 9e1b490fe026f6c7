"""Write files and folders so that a reader never sees half of them.

Each output goes to a hidden temporary name in the destination folder (same file system, so the
final `os.replace` is atomic) and is renamed only when the writer returned without an exception.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_sibling(path: Path, tag: str) -> Path:
    # Keep the full original name at the end: writers pick the format from the suffix (.nii.gz, .seg.nrrd).
    return path.with_name(f".{tag}-{uuid.uuid4().hex[:8]}-{path.name}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is deleted.

    The parent folder is created if needed. Usage::

        with atomic_write("out/labelmap.nii.gz") as tmp:
            sitk.WriteImage(image, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer did not create {tmp}")
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst` (which `os.replace` cannot do when non-empty)."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = _temp_sibling(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    _remove(old)


def publish(staged: Path, final: Path) -> Path:
    """Move a finished file or folder into place, replacing what was there; returns `final`."""
    if staged.is_dir():
        replace_dir(staged, final)
    else:
        os.replace(staged, final)
    return final


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it becomes `path`, on failure it is deleted.

    Args:
        path: the folder to write.
        replace: True: an existing `path` is replaced. False: the first writer wins; if `path` exists
            by the time this one finishes (another process wrote it), this one's folder is dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if replace:
            replace_dir(tmp, path)
        else:
            try:
                os.rename(tmp, path)  # refuses an existing non-empty folder: never half of two entries
            except OSError:
                if not path.is_dir():  # not just another writer winning the race
                    raise
    finally:
        _remove(tmp)
