"""A model folder is closed: every file a model names is a regular file inside its folder.

File names in a manifest are plain names (no separators, no `..`, not absolute), and a file
(manifest.json included) may be a symlink only to another file in the same folder. Every check
here uses `lstat`/`readlink`, never `open`, so nothing outside the folder is opened, not even to
say why it was refused (and no message shows anything about such a file but its name).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from UniversalSegLib.errors import ModelFileError


def check_plain_name(name: object, field: str, where: str) -> str:
    """`name` if it is a plain file name; ModelFileError otherwise.

    Args:
        name: the value of a manifest field naming a file in the folder.
        field: the field's name, for the message.
        where: the model folder, for the message.
    """
    ok = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
          and "\0" not in name and ":" not in name and not name.startswith("~") and name == name.strip())
    if not ok:
        raise ModelFileError(f"{where}: {field} {name!r} is not a plain file name in the model folder "
                             f"(no folders, '..' or absolute paths); refusing to load it")
    return name


def inside_path(directory: Path, name: str) -> Path:
    """The real path of file `name` of a model folder, after checking it stays inside.

    Raises ModelFileError if it is missing, not a regular file, or a symlink that leaves the folder.
    """
    where = str(directory)
    check_plain_name(name, "file", where)
    root = Path(os.path.realpath(directory))
    link = root / name
    try:
        mode = os.lstat(link).st_mode
    except FileNotFoundError:
        raise ModelFileError(f"{where}: {name} is missing") from None
    real = Path(os.path.realpath(link))
    if real.parent != root:
        raise ModelFileError(f"{where}: {name} is a symlink that leaves the model folder; refusing to read it")
    if stat.S_ISLNK(mode):
        try:
            mode = os.lstat(real).st_mode
        except FileNotFoundError:
            raise ModelFileError(f"{where}: {name} is a broken symlink") from None
    if not stat.S_ISREG(mode):
        raise ModelFileError(f"{where}: {name} is not a regular file; refusing to read it")
    return real


def open_inside(directory: Path, name: str):
    """Open file `name` of a model folder for binary reading, refusing anything outside it.

    The final component is opened with O_NOFOLLOW, so a symlink swapped in after the check
    is not followed.
    """
    real = inside_path(directory, name)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real, flags)
    except OSError as e:
        raise ModelFileError(f"{directory}: {name} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelFileError(f"{directory}: {name} is not a regular file; refusing to read it")
    return os.fdopen(fd, "rb")
