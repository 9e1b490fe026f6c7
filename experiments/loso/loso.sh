#!/usr/bin/env bash
# Issue 8's leave-one-scan-out check of the default-model recipe, both directions at once:
#   noB: no label of scan B (the angiogram) is used; aorta and T12 are scored on B
#   noA: scan A's aorta and T12 labels are not used; they are scored on A
# Each direction runs the recipe (`universalseg train`, a config written beside the run) as two stages
# from scratch: `basic` (learn the anatomy), then `generalise` started from stage 1 (domain
# randomisation, exclusion loss), then experiments/model_space_dice.py.
#
#   bash experiments/loso/loso.sh [RUN_DIR]          # env: DEVICE, STAGE1_STEPS, STAGE2_STEPS, DIRECTIONS,
#                                                   #   GENERALISE_SET (stage 2's --generalise-set, e.g. "p_split_lumen=0.5")
# (with the project's .venv active: it calls `python`)
#
# On one GPU both directions share it (small batches leave it mostly idle). On a 2-core CPU run one
# direction at a time (DIRECTIONS=noB, then DIRECTIONS=noA): ~3.7 s/step on both cores (session 9),
# against ~8 s/step each when they share the cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-training/default_model/runs/loso}
DEVICE=${DEVICE:-$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
export STAGE1_STEPS=${STAGE1_STEPS:-2146}
export STAGE2_STEPS=${STAGE2_STEPS:-800}
export GENERALISE_SET=${GENERALISE_SET:-}
# Scan C (chest-pa) is a sub-crop of scan B's study (same voxels where they overlap), and the
# chest-over-abdomen composite stacks C's chest: a true leave-B-out drops all three sources (and the
# classes only they annotate). Leave-A's-aorta-out narrows A's classes and hides those structures from
# the structure map A's sources and the composite synthesise from.
config() {  # recipe.yaml, as two stages (1: basic, 2: generalise from 1) with one direction's leave-out
  python - "$1" "$2" <<'PY'
import os, sys, yaml
from pathlib import Path
from UniversalSegLib.config_file import read_config_file
from UniversalSegLib.data import load_dataset_specs
direction, out = sys.argv[1], sys.argv[2]
recipe_dir = Path("training/default_model").resolve()
recipe = read_config_file(recipe_dir / "recipe.yaml")
left_out = {"noB": ["angiogram", "chest-pa", "chest-over-abdomen"], "noA": []}[direction]
recipe["datasets"] = [d for d in recipe["datasets"] if d["name"] not in left_out]
for d in recipe["datasets"]:
    if "root" in d:
        d["root"] = os.path.normpath(recipe_dir / d["root"])
    if direction == "noA" and d["name"] in ("abdomen-organs", "abdomen-gi-vessels-bones"):
        d["hide_structures"] = ["aorta", "vertebrae_T12"]
    if direction == "noA" and d["name"] == "abdomen-gi-vessels-bones":
        d["classes"] = [k for k in d["label_map"].values() if k not in ("aorta", "vertebrae_T12")]
annotated = {k for spec in load_dataset_specs(recipe["datasets"], recipe_dir) for k in spec.classes}
recipe["model"]["classes"] = [k for k in recipe["model"]["classes"] if k in annotated]  # heads that can learn
names = [d["name"] for d in recipe["datasets"]]
recipe["stages"] = [{"name": "stage1", "datasets": names, "train": {"augment": "basic", "exclusion_weight": 0.0}},
                    {"name": "stage2", "datasets": names, "train": {"lr": 2.0e-4}}]
recipe["output"] = out
yaml.safe_dump(recipe, open(f"{out}.yaml", "w"), sort_keys=False)
PY
}
mkdir -p "$RUN"
DIRECTIONS=${DIRECTIONS:-noB noA}
read -ra directions <<< "$DIRECTIONS"
cores=$(nproc)
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=$(( cores > ${#directions[@]} ? cores / ${#directions[@]} : 1 ))

direction() {
  local name=$1 out=$RUN/$1
  mkdir -p "$out"
  config "$name" "$(realpath "$out")"
  # the stages' step counts: STAGE1_STEPS and STAGE2_STEPS (GENERALISE_SET: KEY=VALUE of stage 2)
  python - "$out.yaml" <<'PY'
import os, sys, yaml
path = sys.argv[1]
c = yaml.safe_load(open(path))
c["stages"][0]["train"]["steps"] = int(os.environ["STAGE1_STEPS"])
c["stages"][1]["train"]["steps"] = int(os.environ["STAGE2_STEPS"])
for item in filter(None, os.environ.get("GENERALISE_SET", "").split()):
    key, _, value = item.partition("=")
    c["stages"][1].setdefault("generalise", {})[key] = float(value)
yaml.safe_dump(c, open(path, "w"), sort_keys=False)
PY
  python -m UniversalSegLib train "$out.yaml" --device "$DEVICE" --resume --no-progress
  # model_space_dice reads the retired prepare.py's build/bundle.npz (experiments/README.md, *bundle*)
  python -m experiments.model_space_dice "$out/model" --json "$out/dice.json"
}

for name in "${directions[@]}"; do
  [[ "$name" == noA || "$name" == noB ]] || { echo "error: DIRECTIONS: unknown direction $name (noB, noA)" >&2; exit 2; }
  direction "$name" > "$RUN.$name.log" 2>&1 &
done
wait
python - "$RUN" <<'EOF'
import json, os, sys
run = sys.argv[1]
scored = {"noB": ("scan B without B's labels", "angiogram"),
          "noA": ("scan A without A's aorta/T12", "abdomen-gi-vessels-bones")}
report = {}
for name, (title, source) in scored.items():
    path = f"{run}/{name}/dice.json"
    if os.path.exists(path):
        dice = json.load(open(path))[source]
        report[title] = {k: dice.get(k) for k in ("aorta", "vertebrae_T12")}
print(json.dumps(report))
EOF
