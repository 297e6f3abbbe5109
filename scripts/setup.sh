#!/usr/bin/env bash
# Create .venv (once) and install s2dm with the given extras, e.g. `scripts/setup.sh test`.
# Torch is pinned to the release this project is tested with; on machines whose pip has a
# local wheel cache for it (the project's CI) this takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${S2DM_TORCH:-2.14.1}" "torchvision==${S2DM_TORCHVISION:-0.29.1}"
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
# Install (editable) once per set of extras, and again when pyproject.toml changes.
stamp=".venv/.s2dm-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ ! -x .venv/bin/s2dm ]; then
  # PYTHONWARNINGS: setuptools warns at every editable install of a package folder that a
  # same-named folder in the working directory would shadow it; not news to anyone here.
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e "$spec"
  touch "$stamp"
fi
echo "s2dm is installed in .venv: 'source .venv/bin/activate' puts the s2dm command on your PATH (or run .venv/bin/s2dm)."
