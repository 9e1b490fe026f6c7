"""Stand-in for slicer.packaging of Slicer >= 5.12 (see ../README.md): records pip_ensure calls.
Tests emulate Slicer 5.10, which has no slicer.packaging, by setting sys.modules["slicer.packaging"] = None."""

calls: list = []


def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
               requester=None, skip_in_testing=True, show_progress=True):
    """Mimics Base/Python/slicer/packaging.py pip_ensure (Slicer >= 5.12): recorded, not run."""
    calls.append({"requirements": list(requirements), "skip_packages": skip_packages,
                  "prompt_install": prompt_install, "requester": requester, "skip_in_testing": skip_in_testing})
    return []
