#!/usr/bin/env bash
# Sets up the environment and segments the bundled sample CT with the bundled default model.
# Results land in out/sample/: segmentation.seg.nrrd (open in 3D Slicer), masks/, labelmap.nii.gz,
# statistics.csv/json and preview.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/universalseg predict UniversalSegLib/resources/sample/ct_abdomen.nii.gz -o out/sample \
  --formats seg.nrrd,nifti,labelmap,stats,preview "$@"
