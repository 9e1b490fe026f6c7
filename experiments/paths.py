"""Where the experiments find the repository's data and the default model's recipe."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / "Testing" / "data" / "shared"  # scans A, B, C and the MR (copies of ../shared/data)
RECIPE_DIR = REPO / "training" / "default_model"
RECIPE = RECIPE_DIR / "recipe.yaml"
BUNDLE = RECIPE_DIR / "build" / "bundle.npz"  # model-space arrays built by the recipe's prepare step


def scan_a_sources() -> tuple[Path, Path, dict[str, int]]:
    """Scan A as the recipe's two `abdomen-*` datasets give it: (image, TotalSegmentator label map,
    class key -> label id over both datasets)."""
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    entries = [d for d in recipe["datasets"] if d["name"].startswith("abdomen-")]
    case = entries[0]["cases"][0]
    root = (RECIPE_DIR / entries[0]["root"]).resolve()
    ids = {key: int(label) for d in entries for label, key in d["label_map"].items()}
    return root / case["image"], root / case["label"], ids
