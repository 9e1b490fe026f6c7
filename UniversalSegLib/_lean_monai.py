"""Keep MONAI's import lean: skip the optional extras it loads eagerly but UniversalSeg never uses.

`import monai` initialises every sub-package, and their `optional_import` calls load transformers,
scikit-learn, matplotlib and pandas if installed: about 5 s and 150 MB per process on our machines
(measured: 262 MB and 6.6 s for `import monai` after torch; 107 MB and 1.4 s without the extras).
Every CLI call and every Slicer run is a fresh process, so this is paid on each.

While MONAI initialises, this finder refuses those packages; MONAI records them as unavailable
for its own optional features (Transchex, plotting, CSV datasets), none of which we use. Once MONAI
is imported, the packages import normally (our CLIP text encoder and training plots still work).

The same holds for SciPy's signal, stats, optimize and interpolate subpackages (33 MB of the
inference pipeline's peak, measured with `import UniversalSegLib.inference.predict`): in MONAI they
serve only DiNTS, panoptic quality, FID, 1D signal filters and ultrasound confidence maps.
`scipy.ndimage` and `scipy.spatial`, which MONAI's Dice/surface-distance metrics use, load as usual.
Set UNIVERSALSEG_FULL_MONAI=1 to turn this off.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

SKIPPED_WHILE_MONAI_INITIALISES = frozenset({"transformers", "sklearn", "matplotlib", "pandas", "skimage",
                                             "scipy.signal", "scipy.stats", "scipy.optimize", "scipy.interpolate"})


def _skipped(fullname: str) -> bool:
    """Whether `fullname` is one of the skipped packages or inside one."""
    return any(fullname == name or fullname.startswith(name + ".") for name in SKIPPED_WHILE_MONAI_INITIALISES)


def _monai_initialising() -> bool:
    spec = getattr(sys.modules.get("monai"), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


class SkipMonaiExtras(importlib.abc.MetaPathFinder):
    """Refuses the extras above, only while `monai` itself is being imported."""

    def find_spec(self, fullname, path=None, target=None):
        if _skipped(fullname) and _monai_initialising():
            raise ModuleNotFoundError(f"{fullname} is not loaded while MONAI initialises (see {__name__})",
                                      name=fullname)
        return None


def install() -> None:
    """Put the finder first on sys.meta_path (once; a no-op after MONAI is imported or when opted out)."""
    if os.environ.get("UNIVERSALSEG_FULL_MONAI") == "1" or "monai" in sys.modules:
        return
    if not any(isinstance(f, SkipMonaiExtras) for f in sys.meta_path):
        sys.meta_path.insert(0, SkipMonaiExtras())
