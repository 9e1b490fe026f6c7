#!/usr/bin/env bash
# Issue 8's leave-one-scan-out check of the default-model recipe, both directions at once:
#   noB: no label of scan B (the angiogram) is used; aorta and T12 are scored on B
#   noA: scan A's aorta and T12 labels are not used; they are scored on A
# Each direction runs the recipe's two stages from scratch: `basic` (learn the anatomy), then
# `generalise` started from stage 1 (domain randomisation, exclusion loss), then evaluate.py.
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
STAGE1_STEPS=${STAGE1_STEPS:-2146}
STAGE2_STEPS=${STAGE2_STEPS:-800}
NAME=universalseg-demo
B_LABELS=aorta,vertebrae_T12,celiac_trunk,superior_mesenteric_artery,subclavian_artery_left
B_LABELS=$B_LABELS,common_carotid_artery_left,brachiocephalic_trunk
# Scan C (chest-pa) is a sub-crop of scan B's study (same voxels where they overlap), and the
# chest-over-abdomen composite stacks C's chest: a true leave-B-out drops both as well.
declare -A DROP=([noB]="angiogram:$B_LABELS chest-pa:pulmonary_artery,heart chest-over-abdomen:pulmonary_artery,heart,spleen,kidney_right,kidney_left,gallbladder,liver,adrenal_gland_right,adrenal_gland_left"
                 [noA]="abdomen-gi-vessels-bones:aorta,vertebrae_T12 chest-over-abdomen:aorta,vertebrae_T12")
# (a dropped key also clears its id from that source's scan's structure map: the composite carries A's)
mkdir -p "$RUN"
[ -f training/default_model/build/bundle.npz ] || python training/default_model/prepare.py
DIRECTIONS=${DIRECTIONS:-noB noA}
read -ra directions <<< "$DIRECTIONS"
cores=$(nproc)
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=$(( cores > ${#directions[@]} ? cores / ${#directions[@]} : 1 ))

direction() {
  local name=$1 out=$RUN/$1
  mkdir -p "$out"
  resume=(); [ -f "$out/stage1/last/manifest.json" ] && resume=(--resume)
  python training/default_model/train.py --device "$DEVICE" --augment basic --steps "$STAGE1_STEPS" \
    --drop ${DROP[$name]} --run "$out/stage1" "${resume[@]}"
  resume=(); [ -f "$out/stage2/last/manifest.json" ] && resume=(--resume)
  python training/default_model/train.py --device "$DEVICE" --augment generalise --steps "$STAGE2_STEPS" \
    --init "$out/stage1/$NAME" --lr 2e-4 --drop ${DROP[$name]} --run "$out/stage2" "${resume[@]}" \
    --generalise-set ${GENERALISE_SET:-}
  python training/default_model/evaluate.py "$out/stage2/$NAME" --json "$out/dice.json"
}

for name in "${directions[@]}"; do
  [ -n "${DROP[$name]:-}" ] || { echo "error: DIRECTIONS: unknown direction $name (noB, noA)" >&2; exit 2; }
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
