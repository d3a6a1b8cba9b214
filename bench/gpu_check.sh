#!/usr/bin/env bash
# The GPU checks of mgt-scale in one device call (issues #8 item 4 and #32; the device tool's machines have no
# network, no DeepSpeed, and about 10 minutes a call). Two steps:
#   here, once:        bash bench/gpu_check.sh prepare   # wheels for DeepSpeed and what it needs -> .whl/
#   on the device:     bash bench/gpu_check.sh run       # with carry [".whl"]; results under $OUT
# `run` does, each step timed and logged to $OUT (bench/RESULTS.md, "GPU checks", says what to record), all
# within MGT_GPU_BUDGET_S seconds (default 560; each step gets what is left, the last step the rest):
#   1. bench/gpu_check.py: init on the GPU = CPU bit for bit, fused MGT = reference in fp32, checkpointing
#      keeps gradients, bf16 trains like fp32;
#   2. `mgt train` on one GPU, ZeRO-3 bf16 (NCCL; our collectives on the device): 20 steps; then the same
#      run killed at step 13 (checkpoint at 10) and resumed, its losses against the first run's;
#   3. bench/gpu_perf.py: the ZeRO-3 engine at 100 layers, width 1024, seq 2048, bf16, full checkpointing:
#      tokens/s, MFU and peak memory of the GPU profile against the cpu profile (the settings before it),
#      `parallel.compile: blocks` against eager, the efficient MGT and the full form against pre-LN; rows in
#      priority order until the budget is spent.
# MGT_GPU_QUICK=1 shrinks step 3 to a small fp32 shape (a dry run, or a short lease). `run` works on a CPU
# machine too (step 3 then runs the small shape), which is how it was tried before any GPU was lent.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0)

if [ "$mode" = prepare ]; then
  set -e
  grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  mkdir -p .whl
  PY=${PYTHON:-.venv/bin/python}
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  "$PY" -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
  ls -la .whl
  exit 0
fi
[ "$mode" = run ] || { echo "usage: bash bench/gpu_check.sh prepare|run" >&2; exit 2; }

OUT=${OUT:-/tmp/mgt_gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  [ -d .whl ] || { echo "no DeepSpeed here and no .whl/: run 'bash bench/gpu_check.sh prepare' first" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mgt_site .whl/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:/tmp/mgt_site"
fi
BUDGET=${MGT_GPU_BUDGET_S:-560}
left() { echo $((BUDGET - SECONDS)); }
step() {  # step NAME LIMIT_S COMMAND...: run (limit capped by the budget left), log to $OUT/NAME.log, record
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -lt 10 ]; then echo "$name not run: budget spent" | tee -a "$OUT/summary.txt"; return; fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}
: > "$OUT/summary.txt"
{ nvidia-smi -L 2>/dev/null; "$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none', 'deepspeed', deepspeed.__version__)"; } \
  2>&1 | grep -v WARNING | tee "$OUT/env.txt"

DEV=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
PREC=$([ "$DEV" = cuda ] && echo bf16 || echo fp32)  # bf16 matmul on an AVX2 CPU is ~400x slower

step checks 150 "$PY" bench/gpu_check.py

RUN=/tmp/mgt_gpu_runs
rm -rf "$RUN"
TRAIN=("$PY" -m mgt_scale.cli train --config configs/tiny_synthetic.yaml --set parallel.precision="$PREC"
       --set train.max_steps=20 --set checkpoint.interval=5 --set data.synthetic=random)
step train 90 "${TRAIN[@]}" --set run.dir="$RUN/full"
step killed 90 env PYTHONPATH="$PWD/tests/fault_hooks${PYTHONPATH:+:$PYTHONPATH}" MGT_FAULT_SIGKILL_AT_STEP=13 "${TRAIN[@]}" --set run.dir="$RUN/resumed"
step resumed 90 "${TRAIN[@]}" --set run.dir="$RUN/resumed" --resume auto
"$PY" - "$RUN" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"  # $OUT: 7 files (the device returns 8 at most)
import json, sys
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{d}/metrics.jsonl")) if "loss" in r}
try:
    a, b = losses("full"), losses("resumed")
    diff = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    print(f"steps full {sorted(a) == list(range(1, 21))}, resumed {sorted(b) == list(range(1, 21))}; "
          f"max relative loss difference {diff:.2e}; bit-identical {a == b}")
except Exception as e:
    print(f"no comparison: {type(e).__name__}: {e}")
EOF

QUICK=()
if [ "${MGT_GPU_QUICK:-0}" = 1 ] || [ "$DEV" != cuda ]; then QUICK=(--quick); fi
PERF_S=$(( $(left) - 10 ))  # the rest, less time to write the summary
step perf $((PERF_S + 5)) "$PY" bench/gpu_perf.py --budget "$PERF_S" ${QUICK[@]+"${QUICK[@]}"}
echo "logs in $OUT"; cat "$OUT/summary.txt"
