#!/usr/bin/env python
# The demo's step time under two checkouts of mgt-scale, side by side in one run (issue #29 asks for a
# before/after table of a refactor): each checkout trains configs/demo.yaml for --steps steps in a fresh
# run directory, alternating A, B, A, B, ... --repeats times, and the table gives the median step time
# (steps after the first --skip, which compile and warm up) of each, and their ratio. Usage:
#   python bench/demo_step_compare.py --a /path/to/old/checkout --b . [--steps 40] [--repeats 3]
# Both checkouts run under this interpreter with PYTHONPATH set to the checkout, on the data of --data
# (default: data/stdlib of --b, as scripts/demo.sh prepares it).
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(checkout: Path, data: Path, steps: int, skip: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="demo_step_") as tmp:
        env = dict(os.environ, PYTHONPATH=str(checkout), CUDA_VISIBLE_DEVICES="", WANDB_MODE="offline")
        cmd = [sys.executable, "-m", "mgt_scale.train.entry", "--config", str(checkout / "configs/demo.yaml"),
               "--set", f"run.dir={tmp}/run", "--set", f"data.path={data}", "--set", f"train.max_steps={steps}",
               "--set", "train.log_interval=1", "--set", "checkpoint.interval=0", "--set", "monitor.interval=0"]
        subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rows = [json.loads(line) for line in (Path(tmp) / "run/metrics.jsonl").read_text().splitlines() if line]
        return [r["step_time"] for r in rows if "step_time" in r and r.get("step", 0) > skip]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--a", required=True, type=Path, help="checkout A (e.g. the commit before the change)")
    ap.add_argument("--b", default=Path("."), type=Path, help="checkout B (default: this one)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    a, b = args.a.resolve(), args.b.resolve()
    data = (args.data or b / "data/stdlib").resolve()
    times: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(args.repeats):
        for name, checkout in (("A", a), ("B", b)):
            times[name] += one_run(checkout, data, args.steps, args.skip)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| checkout | path | steps timed | median step time (s) | B/A |")
    print("|---|---|---|---|---|")
    print(f"| A | {a} | {len(times['A'])} | {med['A']:.4f} | |")
    print(f"| B | {b} | {len(times['B'])} | {med['B']:.4f} | {med['B'] / med['A']:.3f} |")


if __name__ == "__main__":
    main()
