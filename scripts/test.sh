#!/usr/bin/env bash
# Sets up the environment, lints, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
# UTF-8 whatever the locale: progress bars print non-ASCII characters that subprocess tests decode
export HF_HUB_OFFLINE=1 PYTHONUTF8=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/python -m pytest -q "$@"
