"""Moved to `UniversalSegLib.data.stacking` (issue 26: the `stack` dataset format of `universalseg train`).

Kept only so `check_generalisation.py` keeps importing `stack_above` until it moves out of this folder.
"""

from UniversalSegLib.data.stacking import fit_plane, lowest_slice_above, stack_above  # noqa: F401
