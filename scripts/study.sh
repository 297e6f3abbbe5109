#!/usr/bin/env bash
# The main job on the embedded default: set up, then the skip-step-loss study on scikit-learn's
# 8×8 digits (no download). `--quick`: baseline, S²-DM and the ε-scaling control, one seed,
# four cells (~5 min on 2 CPU cores + set-up); without it the full study (~35 min). Prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/s2dm study --config configs/study_digits.yaml "$@"
