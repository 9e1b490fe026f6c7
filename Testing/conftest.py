"""Shared fixtures: paths to the real CT data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.utils._device

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "UniversalSegLib" / "resources" / "sample"
# The real volumes of ../shared/data, copied into Testing/data/shared (9 MB, with its licence) so that a
# fresh clone tests on them wherever it lies; UNIVERSALSEG_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("UNIVERSALSEG_SHARED_DATA", REPO / "Testing" / "data" / "shared"))

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
# transformers (>= 5) swaps `torch.linspace` for a CPU-only wrapper while it builds a text model; if torch
# first caches its list of factory functions then, the meta-device context stops covering linspace for
# the rest of the process, and a model that cannot be built on the meta device (MONAI 1.6's Swin UNETR)
# passes in the suite but fails in a user's fresh process. Filling the cache now keeps the suite faithful.
torch.utils._device._device_constructors()


@pytest.fixture(autouse=True)
def _isolated_user_models(tmp_path_factory, monkeypatch):
    """Every test gets an empty user model folder, so nothing leaks into ~/.universalseg."""
    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(tmp_path_factory.mktemp("user_models")))


@pytest.fixture(scope="session")
def minilm():
    from UniversalSegLib.text import MiniLMEncoder

    return MiniLMEncoder()


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not available")
    return path


def demo_spec(tmp_path: Path) -> Path:
    """training/datasets_shared_demo.yaml (written for ../shared/data) pointed at the data the tests use."""
    data = shared("ct-abdomen", "ct.nii.gz").parents[1]
    text = (REPO / "training" / "datasets_shared_demo.yaml").read_text().replace("../../shared/data", str(data))
    path = tmp_path / "datasets_shared_demo.yaml"
    path.write_text(text)
    return path
