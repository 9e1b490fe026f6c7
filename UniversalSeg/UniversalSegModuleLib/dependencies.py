"""First-run installation of the backend's dependencies into Slicer's Python, with the user's consent.

torch comes only from the PyTorch extension (PyTorchUtils picks the CUDA build that matches the
driver). The backend `UniversalSegLib` ships inside the extension and is pip-installed from there,
with `--no-deps --no-build-isolation` for itself (no download: Slicer's Python has setuptools)
and its remaining requirements installed without ever replacing Slicer's SimpleITK, numpy or
requests (nor torch). torch is installed by light-the-torch in a child process, as PyTorchUtils
would, so that the install step never imports torch into Slicer's process. An installed backend
older than the bundled one is "stale" and the user is offered the update. The `DependencyInstaller`
protocol is the seam tests fake; `SlicerDependencyInstaller` is the real one (it imports slicer only
inside its methods).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

BACKEND_DISTRIBUTION = "UniversalSegLib"
BUNDLED_BACKEND_FOLDER = "UniversalSegBackend"  # next to UniversalSeg.py in an installed extension
SKIP_PACKAGES = ("SimpleITK", "numpy", "requests", "torch")
BACKEND_PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in")
# Used only when the bundled pyproject.toml names no torch requirement. The real floor is read from
# there (`backend_torch_requirement`), so Slicer asks PyTorchUtils for the torch the backend was tested with:
# an older torch would later be replaced by a PyPI build (losing the CUDA build PyTorchUtils chose)
# or run untested. MONAI 1.6 itself needs torch >= 2.8.
DEFAULT_TORCH_REQUIREMENT = ">=2.8"
REQUESTER = "UniversalSeg"
# Set to 1 to run the full self-test (installs packages, runs torch on the CPU); ctest runs a smoke test.
FULL_SELFTEST_ENV = "UNIVERSALSEG_FULL_SELFTEST"


def full_selftest_requested() -> bool:
    """Whether the environment asks for the full self-test (see FULL_SELFTEST_ENV)."""
    return os.environ.get(FULL_SELFTEST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class DependencyError(RuntimeError):
    """Dependencies are missing and could not (or may not) be installed."""


def unique_temp_dir(key: str) -> Path:
    """A new, empty folder of our own in Slicer's temporary folder. `slicer.util.tempDirectory(key)` names
    its folder by time to the millisecond and reuses an existing one, so two jobs started in the same
    millisecond would share (and delete) each other's files."""
    import tempfile

    import slicer

    return Path(tempfile.mkdtemp(prefix=f"{key}-", dir=slicer.app.temporaryPath))


class DependencyInstaller(Protocol):
    """What the module needs from its host to check and install dependencies."""

    def torch_version(self) -> str | None:
        """The installed torch version, or None."""
        ...

    def install_torch(self, requirement: str) -> bool:
        """Install torch through the PyTorch extension; False when that was not possible."""
        ...

    def backend_version(self) -> str | None:
        """The installed UniversalSegLib version, or None."""
        ...

    def install_backend(self, source_dir: Path, upgrade: bool) -> None:
        """pip-install the bundled backend and its requirements except SKIP_PACKAGES."""
        ...

    def confirm(self, message: str, details: str) -> bool:
        """Ask the user; True to go ahead."""
        ...


def bundled_backend_dir(module_dir: str | Path) -> Path | None:
    """The backend source shipped with the module: the extension's copy, or the source checkout's root."""
    module_dir = Path(module_dir)
    for candidate in (module_dir / BUNDLED_BACKEND_FOLDER, module_dir.parent):
        if (candidate / "pyproject.toml").is_file() and (candidate / BACKEND_DISTRIBUTION / "__init__.py").is_file():
            return candidate
    return None


def bundled_backend_version(source_dir: str | Path) -> str:
    """`__version__` of the bundled backend, read from its source (importing it would need torch)."""
    text = (Path(source_dir) / BACKEND_DISTRIBUTION / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if not match:
        raise DependencyError(f"no __version__ in the bundled backend at {source_dir}")
    return match.group(1)


def _version_key(version: str):
    try:
        from packaging.version import Version

        return Version(version)
    except Exception:  # packaging missing or a non-PEP 440 string: compare the numeric parts
        return tuple(int(p) for p in re.findall(r"\d+", version))


def is_older(installed: str, bundled: str) -> bool:
    """True when the installed version is older than the bundled one (a stale backend)."""
    return _version_key(installed) < _version_key(bundled)


def copy_backend_source(source_dir: str | Path, destination: str | Path) -> Path:
    """Copy what pip needs to build the backend (the package and its project files), nothing else."""
    source_dir, destination = Path(source_dir), Path(destination)
    shutil.copytree(source_dir / BACKEND_DISTRIBUTION, destination / BACKEND_DISTRIBUTION,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for name in BACKEND_PROJECT_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, destination / name)
    return destination


def read_backend_requirements(source_dir: str | Path) -> list[str]:
    """The `[project] dependencies` of the bundled backend's pyproject.toml."""
    path = Path(source_dir) / "pyproject.toml"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: a tiny reader for the one list we need
        block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", path.read_text(encoding="utf-8"), re.S | re.M)
        return re.findall(r"""["']([^"']+)["']""", re.sub(r"#.*", "", block.group(1))) if block else []
    with open(path, "rb") as f:
        return list(tomllib.load(f).get("project", {}).get("dependencies", []))


def backend_torch_requirement(source_dir: str | Path) -> str:
    """The version specifier of torch in the bundled backend's dependencies (">=2.13"), else the default."""
    for requirement in read_backend_requirements(source_dir):
        if requirement_name(requirement) == "torch":
            specifier = re.sub(r"^\s*[A-Za-z0-9._-]+\s*", "", requirement.split(";")[0]).strip()
            return specifier or DEFAULT_TORCH_REQUIREMENT
    return DEFAULT_TORCH_REQUIREMENT


def read_build_requirements(source_dir: str | Path) -> list[str]:
    """The `[build-system] requires` of the bundled backend's pyproject.toml."""
    text = (Path(source_dir) / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^\[build-system\](.*?)(^\[|\Z)", text, re.S | re.M)
    requires = re.search(r"requires\s*=\s*\[(.*?)\]", block.group(1), re.S) if block else None
    return re.findall(r"""["']([^"']+)["']""", requires.group(1)) if requires else []


def missing_build_requirements(source_dir: str | Path) -> list[str]:
    """Build requirements not installed here; `wheel` is not needed by setuptools >= 70.1 (it has bdist_wheel)."""
    missing = [r for r in read_build_requirements(source_dir) if not is_satisfied(r)]
    if is_satisfied("setuptools>=70.1"):
        missing = [r for r in missing if requirement_name(r) != "wheel"]
    return missing


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("SimpleITK>=2.2" -> "simpleitk")."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", name.group(1)).lower() if name else requirement.lower()


def without_skipped(requirements: Iterable[str], skip: Iterable[str] = SKIP_PACKAGES) -> list[str]:
    skipped = {requirement_name(s) for s in skip}
    return [r for r in requirements if requirement_name(r) not in skipped]


def is_satisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies `requirement` (markers honoured)."""
    try:
        from packaging.requirements import Requirement

        req = Requirement(requirement)
        if req.marker is not None and not req.marker.evaluate():
            return True
        installed = importlib.metadata.version(req.name)
        return req.specifier.contains(installed, prereleases=True)
    except importlib.metadata.PackageNotFoundError:
        return False
    except Exception:  # packaging missing: presence is the best we can check
        try:
            importlib.metadata.version(requirement_name(requirement))
            return True
        except importlib.metadata.PackageNotFoundError:
            return False


@dataclass
class InstallPlan:
    """What has to be installed before the backend can run."""

    install_torch: bool
    install_backend: bool
    upgrade_backend: bool
    installed_version: str | None
    bundled_version: str
    torch_too_old: str | None = None  # installed torch version below the requirement

    @property
    def needed(self) -> bool:
        return self.install_torch or self.install_backend

    def describe(self) -> str:
        lines = []
        if self.install_torch:
            lines.append("PyTorch (through the PyTorch extension; picks the build matching your GPU driver)")
        if self.upgrade_backend:
            lines.append(f"UniversalSeg backend: update {self.installed_version} -> {self.bundled_version}")
        elif self.install_backend:
            lines.append(f"UniversalSeg backend {self.bundled_version} and its Python requirements "
                         f"(Slicer's {', '.join(SKIP_PACKAGES[:3])} are kept)")
        return "\n".join(lines)


def plan_installation(installer: DependencyInstaller, bundled_version: str,
                      torch_requirement: str = DEFAULT_TORCH_REQUIREMENT, force_backend: bool = False) -> InstallPlan:
    """Compare what is installed with what the bundled backend needs."""
    torch = installer.torch_version()
    too_old = None
    if torch is not None and not _torch_ok(torch, torch_requirement):
        too_old = torch
    installed = installer.backend_version()
    stale = installed is not None and is_older(installed, bundled_version)
    return InstallPlan(install_torch=torch is None, install_backend=installed is None or stale or force_backend,
                       upgrade_backend=installed is not None and (stale or force_backend),
                       installed_version=installed, bundled_version=bundled_version, torch_too_old=too_old)


def _torch_ok(version: str, requirement: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(requirement).contains(version.split("+")[0], prereleases=True)
    except Exception:
        return True


def ensure_dependencies(installer: DependencyInstaller, source_dir: Path | None, ask: bool = True,
                        torch_requirement: str | None = None, force_backend: bool = False) -> InstallPlan:
    """Install what is missing or stale, after asking when `ask`; raises DependencyError otherwise.

    Args:
        installer: the host's installer (SlicerDependencyInstaller in Slicer, a fake in tests).
        source_dir: the bundled backend's source folder (`bundled_backend_dir`).
        ask: ask the user before installing anything.
        torch_requirement: torch version specifier; default: the bundled backend's own (pyproject.toml).
        force_backend: reinstall the backend even when the installed one is current.
    """
    if source_dir is None:
        raise DependencyError("the bundled UniversalSeg backend is missing from this installation; "
                              "reinstall the UniversalSeg extension")
    torch_requirement = torch_requirement or backend_torch_requirement(source_dir)
    plan = plan_installation(installer, bundled_backend_version(source_dir), torch_requirement, force_backend)
    if plan.torch_too_old:
        raise DependencyError(f"PyTorch {plan.torch_too_old} is too old (UniversalSeg needs torch{torch_requirement}); "
                              f"update it in the PyTorch Utils module")
    if not plan.needed:
        return plan
    if ask and not installer.confirm("UniversalSeg needs to install Python packages into Slicer. This needs a "
                                     "network connection and may take several minutes. Continue?", plan.describe()):
        raise DependencyError("installation of the required Python packages was declined")
    if plan.install_torch and not installer.install_torch(torch_requirement):
        raise DependencyError("PyTorch could not be installed; install the PyTorch extension from the "
                              "Extensions Manager, then use its PyTorch Utils module")
    if plan.install_backend:
        installer.install_backend(source_dir, upgrade=plan.upgrade_backend)
        if installer.backend_version() is None:
            raise DependencyError("the UniversalSeg backend could not be installed; see the Python console")
    return plan


class SlicerDependencyInstaller:
    """The real installer, for Slicer 5.10 and 5.12+ (slicer.packaging appeared in 5.12)."""

    def torch_version(self) -> str | None:
        try:
            return importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None

    def install_torch(self, requirement: str) -> bool:
        """light-the-torch with PyTorchUtils' own arguments, in a child process: `installTorch` would end
        with `import torch`, loading torch (GBs with CUDA) into Slicer for nothing, since the backend runs
        in its own process, and locking its files against a later update on Windows."""
        import slicer

        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise DependencyError("UniversalSeg needs the PyTorch extension: install it from the Extensions "
                                  "Manager and restart Slicer") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic
        pipArguments = getattr(torchLogic, "_getPipInstallArguments", None)
        installLtt = getattr(torchLogic, "_installLightTheTorch", None)
        if pipArguments is None or installLtt is None:  # another PyTorchUtils: its own install (imports torch)
            return torchLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement) is not None
        if not is_satisfied("light-the-torch>=0.5"):
            installLtt()
        python = shutil.which("PythonSlicer") or sys.executable
        process = slicer.util.launchConsoleProcess([python, "-m", "light_the_torch",
                                                    *pipArguments(None, requirement, None)])
        slicer.util.logProcessOutput(process)  # raises CalledProcessError when ltt fails
        importlib.invalidate_caches()
        return self.torch_version() is not None

    def backend_version(self) -> str | None:
        importlib.invalidate_caches()
        try:
            return importlib.metadata.version(BACKEND_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            return None

    def install_backend(self, source_dir: Path, upgrade: bool) -> None:
        import slicer

        # Without build isolation pip builds with Slicer's own setuptools instead of downloading one
        # (installs work offline); Slicer's Python ships setuptools (SuperBuild/External_python-setuptools).
        missing = missing_build_requirements(source_dir)
        if missing:
            raise DependencyError(f"Slicer's Python lacks {', '.join(missing)}, needed to install the bundled "
                                  f"backend; install it with `PythonSlicer -m pip install {' '.join(missing)}`")
        # pip builds in the source folder, which may be read-only in an installed Slicer: use a copy.
        work = copy_backend_source(source_dir, unique_temp_dir("UniversalSegBackend") / "src")
        try:
            if upgrade:
                slicer.util.pip_uninstall(BACKEND_DISTRIBUTION)
            slicer.util.pip_install([str(work), "--no-deps", "--no-build-isolation"])
            requirements = read_backend_requirements(work)
        finally:
            shutil.rmtree(work.parent, ignore_errors=True)
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            # In Slicer's testing mode (ctest) pip_ensure installs nothing unless the full self-test asks.
            packaging.pip_ensure(requirements, skip_packages=list(SKIP_PACKAGES), prompt_install=False,
                                 requester=REQUESTER, skip_in_testing=not full_selftest_requested())
            return
        # Slicer 5.10: install the remaining requirements one by one; pip keeps the satisfied ones.
        for requirement in without_skipped(requirements):
            if not is_satisfied(requirement):
                slicer.util.pip_install(requirement)

    def confirm(self, message: str, details: str) -> bool:
        import slicer

        return bool(slicer.util.confirmOkCancelDisplay(message, "UniversalSeg - install Python packages",
                                                       detailedText=details))
