#!/usr/bin/env bash
# Creates ./.venv with exactly the versions CI has proven (constraints.txt) and UniversalSegLib
# installed editable. The venv is rebuilt from scratch whenever constraints.txt, pyproject.toml,
# this script or the torch choice change, or when what is installed differs from constraints.txt:
# a leftover venv is never trusted.
#
# Which torch build: pip's default index unless UNIVERSALSEG_TORCH_INDEX names another, e.g.
#   UNIVERSALSEG_TORCH_INDEX=https://download.pytorch.org/whl/cpu    (CPU only, ~200 MB)
#   UNIVERSALSEG_TORCH_INDEX=https://download.pytorch.org/whl/cu128  (NVIDIA GPU, CUDA 12.8)
# On Linux, PyPI's own torch is the multi-GB CUDA build. The version is pinned in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_INDEX=${UNIVERSALSEG_TORCH_INDEX:-}
stamp=.venv/.universalseg-installed
want=$(cat constraints.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-64)-${TORCH_INDEX}

installed_matches_constraints() {
  # Every pin of constraints.txt is what the venv has (a local build tag like +cpu is allowed).
  .venv/bin/python - <<'PY'
import re, sys
from importlib import metadata
bad = []
for line in open("constraints.txt"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, version = line.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        bad.append(f"{name} missing")
        continue
    if have.split("+")[0] != version:
        bad.append(f"{name} {have} (want {version})")
pinned = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in open("constraints.txt") if "==" in line}
for dist in metadata.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if name not in pinned and name not in {"pip", "wheel", "universalseglib"}:
        bad.append(f"{name} {dist.version} not pinned")
if bad:
    print("setup_env: the venv differs from constraints.txt: " + ", ".join(bad[:5]), file=sys.stderr)
    sys.exit(1)
PY
}

if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && installed_matches_constraints; then
  exit 0
fi
rm -rf .venv
"$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --constraint constraints.txt)
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "$TORCH_INDEX" ]; then
  "${pip[@]}" --index-url "$TORCH_INDEX" torch
else
  "${pip[@]}" torch
fi
"${pip[@]}" -e ".[test]"
installed_matches_constraints
echo "$want" > "$stamp"
