#!/usr/bin/env bash
# The built-in demo, from a fresh clone: set up, tokenize the Python standard library with a
# SentencePiece tokenizer trained on it, train an 8-layer MGT (d=128) with DeepSpeed ZeRO-3 on CPU,
# write the report, and print a short summary. Pass --num-ranks 2 to train on 2 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
if [ ! -f data/stdlib/manifest.json ]; then
  mkdir -p data  # ignored by git, so absent from a fresh clone; mgt prep wants the parent of --output
  mgt prep --input "$STDLIB" --output data/stdlib --vocab-size 2048 --num-proc 2
fi
RESUME=()
[ -d runs/demo/checkpoints ] && RESUME=(--resume auto)
mgt train --config configs/demo.yaml "${RESUME[@]}" "$@"
mgt report runs/demo
python - <<'PY'
import json
# training records (a restart of a finished run logs only its evaluation, a record without a loss)
m = [r for r in map(json.loads, open("runs/demo/metrics.jsonl")) if "loss" in r]
s = json.load(open("runs/demo/status.json"))
g = [json.loads(l) for l in open("runs/demo/geometry.jsonl")]
first, last = m[0], m[-1]
print("\n=== demo summary ===")
print(f"steps {last['step']}  loss {first['loss']:.3f} -> {last['loss']:.3f}  valid loss {s.get('valid_loss')}")
print(f"tokens/s (last) {last['tokens_per_s']:.0f}  run state {s['state']}")
if g:
    lay = g[-1]["layers"]
    print(f"normalised effective rank at step {g[-1]['step']}: min {min(l['eff_rank_norm'] for l in lay):.3f}, "
          f"last layer {lay[-1]['eff_rank_norm']:.3f}")
print("report: runs/demo/report/report.md")
PY
