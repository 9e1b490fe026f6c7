"""Where the experiments find the repository's data and the default model's recipe."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / "Testing" / "data" / "shared"  # scans A, B, C and the MR (copies of ../shared/data)
RECIPE_DIR = REPO / "training" / "default_model"
RECIPE = RECIPE_DIR / "recipe.yaml"
BUNDLE = RECIPE_DIR / "build" / "bundle.npz"  # model-space arrays built by the recipe's prepare step
