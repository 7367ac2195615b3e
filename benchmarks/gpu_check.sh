#!/usr/bin/env bash
# make gpu-check: the GPU check on a fresh GPU machine with only this repository (never in CI).
# Sets up .venv with a CUDA build of torch==2.13.0 for this GPU (an existing system torch 2.13 with working
# CUDA is reused: machines without network access), installs the project, then runs benchmarks/gpu_check.py
# (≤ 8 min) which writes benchmarks/raw/gpu_*.json and RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
cuda_ok='import sys, torch; sys.exit(0 if torch.__version__.startswith("2.13.0") and torch.cuda.is_available() else 1)'
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "$cuda_ok" 2>/dev/null; then
    echo "gpu-check: reusing the system's torch $("$PY" -c 'import torch; print(torch.__version__)') (CUDA works)"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "$cuda_ok" 2>/dev/null; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d . || true)
  # torch 2.13's CUDA 13 builds start at Turing (sm_75); Volta (V100, sm_70) needs the CUDA 12.6 build (README)
  tag=cu130
  if [ -n "$cc" ] && [ "$cc" -lt 75 ]; then tag=cu126; fi
  echo "gpu-check: installing torch==2.13.0 from the $tag index (GPU compute capability ${cc:-unknown})"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --force-reinstall torch==2.13.0 --index-url "https://download.pytorch.org/whl/$tag"
fi
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | { grep -v 'is ignored' || true; }
.venv/bin/python -c "$cuda_ok" || { echo "gpu-check: torch cannot use CUDA here"; .venv/bin/python -c \
  "from ofa_lib.train import training; print(training.torch_build())"; exit 2; }
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 .venv/bin/python benchmarks/gpu_check.py "$@"
