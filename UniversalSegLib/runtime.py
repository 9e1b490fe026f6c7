"""Process-level tuning of glibc's allocator for the CPU paths: training wants speed, inference memory.

glibc serves allocations above its mmap threshold with a fresh `mmap` and unmaps them on free, and
it raises that threshold (up to 32 MB) each time such a block is freed. Two opposite costs follow:
- training: each step of a 3D network faults in and zeroes hundreds of MB of pages again; on 2
  cores this doubled a training step (sys time ~ user time). `retain_freed_memory` keeps freed
  memory in the heap for reuse.
- inference: once the threshold has risen, a backbone's many 4-32 MB activations land in the
  heap, where freed holes cannot be given back, and the peak RSS grows by the fragmentation
  (~120 MB for the 32-class benchmark). `return_large_blocks` pins the threshold low, so every
  large block is unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4


def _mallopt():
    """glibc's `mallopt`, or None (not Linux, or not glibc: musl has none)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def return_large_blocks(threshold: int = 32 * 2**20) -> bool:
    """Serve allocations above `threshold` bytes with their own mapping, returned to the OS on free.

    Returns True when glibc accepted it. Affects the whole process from now on (in Slicer too: a
    smaller footprint there is welcome).
    """
    mallopt = _mallopt()
    return bool(mallopt and mallopt(_M_MMAP_THRESHOLD, threshold))


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    Returns True when the allocator accepted the settings (Linux with glibc), False elsewhere.
    Affects the whole process from now on; call it once, before the heavy allocations start.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_MAX, 0)  # large blocks from the heap, so they can be reused
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**30)  # only give back more than 1 GiB of free top
    ok &= mallopt(_M_TOP_PAD, 64 * 2**20)  # grow the heap in 64 MB steps
    return bool(ok)


# Sub-commands that segment CTs: their peak memory matters more than a few percent of time.
_RETURN_LARGE_BLOCKS = frozenset({"predict", "cohort"})


def tune_for_command(command: str) -> None:
    """The allocator setting of a `universalseg` sub-command (the CLI calls it once, before the work).

    Only the command line tunes the allocator: `import UniversalSegLib` and library calls (`predict`,
    `run_training`) leave a host process's allocator as they find it. Training tunes itself in its
    sub-command once the device is known (CPU only: `train/cli.py`).

    Args:
        command: the sub-command's name, e.g. "predict".
    """
    if command in _RETURN_LARGE_BLOCKS:
        return_large_blocks()  # fixed 32 MB mmap threshold; lower ones save memory but cost time
