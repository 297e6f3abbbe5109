#!/usr/bin/env bash
# The GPU benchmark in one command (scripts/bench_gpu.py; ~3-4 minutes on one H100): CIFAR10
# training images/s and peak memory at fp32 / bf16 / bf16+channels_last / bf16+compile, the
# diffusers UNet2DModel reference, DDIM-20 sampling and FID-feature images/s, as Markdown.
# Without CUDA it runs a reduced CPU part and says so. Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/bench_gpu.py "$@"
