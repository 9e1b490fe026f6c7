"""One-off experiments on the bundled model (see README.md). Not part of the package.

Run each from the repository root as a module, e.g. `python -m experiments.check_generalisation`:
the root is then on sys.path, so `experiments.*`, `training.*` (namespace) and UniversalSegLib import
without any sys.path edit.
"""
