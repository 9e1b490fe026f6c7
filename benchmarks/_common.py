"""What the benchmarks share: where the repository is, and measuring THIS checkout's UniversalSegLib.

A benchmark runs as `python benchmarks/bench_x.py` from the repository root; Python puts the
script's own folder (benchmarks/) on sys.path, so `from _common import ...` needs no path edit.
UniversalSegLib itself comes from the environment: scripts/setup_env.sh installs this checkout in
editable mode; with another install, set PYTHONPATH to this checkout (`require_checkout` says so).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"


def require_checkout() -> None:
    """Exit with a one-line message when `import UniversalSegLib` would load another checkout's code
    (figures of another tree, reported as this one's). Finds the package without importing it."""
    spec = importlib.util.find_spec("UniversalSegLib")
    found = Path(spec.origin).resolve().parent if spec and spec.origin else None
    if found != REPO / "UniversalSegLib":
        sys.exit(f"benchmarks: UniversalSegLib would be imported from {found}, not this checkout; "
                 f"run with PYTHONPATH={REPO}")


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that imports this checkout's UniversalSegLib (REPO first on
    PYTHONPATH, the inherited PYTHONPATH after it), plus `extra` variables.

    Args:
        extra: variables to set or override (e.g. OMP_NUM_THREADS="2").
    """
    inherited = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([str(REPO), *([inherited] if inherited else [])])
    return {**os.environ, "PYTHONPATH": path, **extra}


def median_seconds(action, repeat: int) -> float:
    """The median wall time of `repeat` calls of `action()`."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        action()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
