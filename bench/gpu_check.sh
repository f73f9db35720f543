#!/usr/bin/env bash
# GPU check for the paged runner: parity tests on CUDA with both attention backends, then the
# Mistral-7B-shaped decode micro-benchmark. Needs an NVIDIA GPU and a Python with torch (CUDA
# build), xformers matching that torch, and this project's dependencies (pip install -e ".[test]").
# PYTHON picks the interpreter (default python3). Output: pass/fail lines and a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" - <<'PYCHECK'
import torch, xformers
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "xformers", xformers.__version__, torch.cuda.get_device_name())
PYCHECK
"$PY" -m pytest -q -m gpu tests/test_gpu.py
"$PY" -m bench.gpu_check "$@"
