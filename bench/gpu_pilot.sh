#!/usr/bin/env bash
# The GPU pilot of issue #33 in one device call (bench/gpu_pilot.py says what it runs; bench/RESULTS.md,
# "GPU pilot", the command). It uses the machine's own python3 and torch (the device image's PyTorch; no
# pip install: nothing can be fetched there, and the pilot needs neither DeepSpeed nor `datasets`), runs
# the checkout in place (PYTHONPATH), and tees the log to $OUT/pilot.log beside the pilot's 7 files (the
# device tool returns 8). Arguments go to bench/gpu_pilot.py, e.g. --budget-s 420, or --tiny on a CPU:
#   bash bench/gpu_pilot.sh --budget-s 420          # on the device, timeout_s ~ 480
#   PYTHON=.venv/bin/python OUT=/tmp/p bash bench/gpu_pilot.sh --tiny   # here
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mgt_gpu_pilot}
mkdir -p "$OUT"
export OUT
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi -L 2>/dev/null; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"; } 2>&1 | tee "$OUT/pilot.log"
"$PY" bench/gpu_pilot.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/pilot.log"
exit "${PIPESTATUS[0]}"
