"""Reproducible installs: constraints.txt is the set CI proves, and pip resolves the package to it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata

from conftest import REPO


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            found[normalised(name)] = version
    return found


def test_this_environment_is_exactly_the_constrained_set():
    wanted = pins()
    have = {normalised(d.metadata["Name"]): d.version.split("+")[0] for d in metadata.distributions()}
    have = {k: v for k, v in have.items() if k not in {"pip", "wheel", "universalseglib"}}
    assert {k: v for k, v in have.items() if wanted.get(k) != v} == {}
    assert set(wanted) - set(have) == set()


def test_pip_resolves_the_package_with_the_constraints_to_the_tested_set(tmp_path):
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--report", str(report), "--constraint", str(REPO / "constraints.txt"), f"{REPO}[test]"],
                         capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    resolved = {normalised(item["metadata"]["name"]): item["metadata"]["version"].split("+")[0]
                for item in json.loads(report.read_text())["install"]}
    resolved.pop("universalseglib")
    assert resolved == pins()


def test_lower_bounds_in_pyproject_are_the_tested_versions():
    """Every lower bound of what setup_env.sh installs is the major.minor that constraints.txt pins."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in ("text", "test")
                                           for r in project["optional-dependencies"][extra]]
    wanted = pins()
    for name, bound in (re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", r).groups() for r in requirements if ">=" in r):
        tested = wanted[normalised(name)].split(".")
        assert bound.split(".")[:2] == tested[:2], f"{name}>={bound} but CI proves {'.'.join(tested)}"
