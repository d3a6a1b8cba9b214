# Benchmark of our two fixes to DeepSpeed's ZeRO-3 optimizer (mgt_scale/parallel/ds_zero3_fixes.py):
# the same 1-rank ZeRO-3 engine with the fixes on and off (MGT_DS_ZERO3_FIXES), each run in a fresh
# process, rounds alternating the order. Printed side by side: resident memory after the engine is built,
# peak resident memory over the steps, the median `train_step` time and the median time of ZeRO-3's
# `optimizer.step()` (where both act). Processes run with glibc's default malloc, as `mgt train` does.
# A CPU benchmark: it reads resident memory and times without synchronising a GPU, so on a GPU machine
# run it with CUDA_VISIBLE_DEVICES="".
"""Usage: python bench/zero3_fixes.py [--depth 48] [--width 128] [--seq 128] [--batch 8] [--vocab 2048]
                                    [--steps 8] [--rounds 3]"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def worker(spec: dict) -> dict:
    """One engine in this process (fixes as MGT_DS_ZERO3_FIXES says): memory and step times."""
    import torch
    from memory_bench import _rss_mb
    from throughput import trainer_sets

    from mgt_scale.cluster import dist_env
    from mgt_scale.config import load_config
    from mgt_scale.parallel import ds_zero3_fixes
    from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.engine.zero import ZeroEngine

    dist_env.apply(dist_env.derive_dist_env())
    init_distributed(import_deepspeed())
    with tempfile.TemporaryDirectory() as tmp:
        sets = trainer_sets(spec, "zero3", 1, Path(tmp) / "run")
        cfg = load_config(REPO / "configs/tiny_synthetic.yaml", [f"{k}={v}" for k, v in sets.items()])
        engine = ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")
    step_times, opt_times = [], []
    inner = engine.optimizer.step

    def timed_optimizer_step(*args, **kwargs):
        tic = time.perf_counter()
        out = inner(*args, **kwargs)
        opt_times.append(time.perf_counter() - tic)
        return out
    engine.optimizer.step = timed_optimizer_step
    rss_init = _rss_mb()
    x = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0))
    for _ in range(spec["warmup"] + spec["steps"]):
        tic = time.perf_counter()
        engine.train_step([(x, x)])
        step_times.append(time.perf_counter() - tic)
    n_params = sum(p.ds_numel for p in engine.module.parameters())
    return {"fixes": ds_zero3_fixes.describe(), "params": n_params, "rss_init_mb": rss_init,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": statistics.median(step_times[spec["warmup"]:]),
            "opt_step_ms": 1000 * statistics.median(opt_times[spec["warmup"]:])}


def run_worker(spec: dict, fixes: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               WANDB_MODE="offline", MGT_DS_ZERO3_FIXES="1" if fixes else "0")
    r = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--depth", type=int, default=48)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return
    spec = {"layers": args.depth, "width": args.width, "heads": max(1, args.width // 32), "vocab": args.vocab,
            "seq": args.seq, "batch": args.batch, "residual": "mgt", "precision": "fp32", "warmup": 2,
            "steps": args.steps, "device": "cpu"}
    results: dict = {True: [], False: []}
    for r in range(args.rounds):
        for fixes in ((True, False) if r % 2 == 0 else (False, True)):
            results[fixes].append(run_worker(spec, fixes))
    params = results[True][0]["params"]
    print(f"\n### ZeRO-3 on 1 rank, fixes on and off (depth {args.depth}, width {args.width}, batch {args.batch} x "
          f"{args.seq}; {params / 1e6:.1f} M parameters = {params * 4 / 2 ** 20:.0f} MB fp32; medians of "
          f"{args.rounds} processes each)")
    print("| fixes | RSS after init MB | peak RSS MB | train_step s | optimizer.step ms |")
    print("|---|---|---|---|---|")
    med = {}
    for fixes in (True, False):
        rows = results[fixes]
        med[fixes] = {k: statistics.median(x[k] for x in rows)
                      for k in ("rss_init_mb", "peak_rss_mb", "step_s", "opt_step_ms")}
        m = med[fixes]
        print(f"| {'on' if fixes else 'off'} | {m['rss_init_mb']:.0f} | {m['peak_rss_mb']:.0f} | {m['step_s']:.3f} | "
              f"{m['opt_step_ms']:.1f} |")
    on, off = med[True], med[False]
    print(f"| on / off | {on['rss_init_mb'] / off['rss_init_mb']:.3f} | {on['peak_rss_mb'] / off['peak_rss_mb']:.3f} | "
          f"{on['step_s'] / off['step_s']:.3f} | {on['opt_step_ms'] / off['opt_step_ms']:.3f} |")
    print("per process: " + "; ".join(f"{'on' if f else 'off'} {x['step_s']:.3f} s / {x['peak_rss_mb']:.0f} MB"
                                      for f in (True, False) for x in results[f]))


if __name__ == "__main__":
    main()
