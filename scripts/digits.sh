#!/usr/bin/env bash
# The main job on the embedded default: set up, train on scikit-learn's 8×8 digits with the
# skip-step loss, and write a PNG grid of EMA samples (runs/digits/samples/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/s2dm train --config configs/digits.yaml --out runs/digits "$@"
