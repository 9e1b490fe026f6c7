#!/usr/bin/env bash
# Sets up the environment, lints, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
# UTF-8 whatever the locale: progress bars print non-ASCII characters that subprocess tests decode
export HF_HUB_OFFLINE=1 PYTHONUTF8=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# A new random test order each run (pytest-randomly); the seed is printed so that an order can be repeated
# with UNIVERSALSEG_TEST_SEED=N bash scripts/test.sh (or pass -p no:randomly for the file order).
seed=${UNIVERSALSEG_TEST_SEED:-$((RANDOM * 32768 + RANDOM))}
case " $* " in *no:randomly*) order=() ;; *) order=(-p randomly "--randomly-seed=$seed"); echo "test order seed: $seed" ;; esac
.venv/bin/python -m pytest -q ${order[@]+"${order[@]}"} "$@"
