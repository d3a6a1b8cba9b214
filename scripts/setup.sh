#!/usr/bin/env bash
# Create .venv and install mgt-scale with its test extras (dev, tensorboard, and hf + eval for the
# Hugging Face export and lm-eval tests). On a machine without CUDA it installs the
# CPU build of torch first (torch==2.13.0 from the local wheel cache where present), so pip never
# pulls a multi-GB CUDA build. Set MGT_TORCH to choose another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${MGT_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev,tensorboard,hf,eval]"
echo "setup: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
