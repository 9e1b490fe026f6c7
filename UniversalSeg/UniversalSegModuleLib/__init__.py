"""Helpers of the UniversalSeg 3D Slicer module that need neither Slicer nor the backend.

Everything here is plain Python so it runs (and is tested) outside Slicer:
    process       start the backend as a background process, read its output, kill its whole tree
    backend       command lines of the `universalseg` CLI, the --progress-json protocol, statistics
    dependencies  first-run installation of torch and the bundled backend, stale-backend detection
    classes       grouping and searching the class list shown in the panel
    wizard        the add-classes wizard: validation, training data spec, `extend` command line
The Slicer-facing code lives in UniversalSeg.py and wizard_dialog.py.
"""
