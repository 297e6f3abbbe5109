#!/usr/bin/env bash
# GPU smoke test in one command (scripts/gpu_smoke.py): five minutes or less on one GPU, no
# download. On a random CIFAR10-shaped data set in the real archive format it trains 200 steps
# of the CIFAR10 config at fp32 and at bf16 + compile, kills a run and resumes it bit-exact,
# trains under torchrun (NCCL), samples with every sampler, scores FD-pixels and FID on 1,000
# samples and runs scripts/bench_gpu.sh with reduced arguments; one PASS/FAIL/SKIP line per
# check. A CPU part (toy sizes) runs first; without CUDA it is the whole run and the script
# says so. Exit 0 when no check failed. Extra arguments go to the script (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_smoke.py "$@"
