# Activation-checkpointing benchmark: peak resident memory of one training step (forward, backward,
# AdamW step) of the MGT stack with and without activation checkpointing, at several depths, and the
# step-time ratio. Each configuration runs in a fresh subprocess so peaks do not mix.
"""Usage: python bench/memory_bench.py [--depths 50,100,200] [--d-model 64] [--seq 128] [--batch 4]

Per configuration: build the model (plain torch, fp32, CPU) and torch AdamW and read the resident set
size (RSS, /proc/self/statm) as the baseline (libraries + weights), then run one warm-up step and
--steps timed steps. Reported: peak RSS of the process (getrusage ru_maxrss), the training peak over
the baseline (activations, gradients and the Adam moments; the last two, 3 x params x 4 bytes, are the
same with and without checkpointing, so they are also shown and subtracted for the activation ratio),
and the median step time. The baseline is taken before the first step on purpose: after a step the
allocator keeps freed activation pages, which would hide most of the peak. Activation checkpointing =
mgt_scale.parallel.checkpointing.apply_activation_checkpointing, one block per segment (torch non-reentrant
checkpoint per block, as zero mode does)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(a: argparse.Namespace) -> dict:
    import torch

    from mgt_scale.config import ModelConfig, TrainConfig
    from mgt_scale.model import build_model, count_parameters, lm_loss
    from mgt_scale.train.optim import build_optimizer

    torch.set_num_threads(a.threads)
    cfg = ModelConfig(num_layers=a.depth, d_model=a.d_model, num_heads=a.heads, d_ff=4 * a.d_model,
                      vocab_size=a.vocab, max_seq_len=a.seq, residual=a.residual)
    model = build_model(cfg, seed=0)
    from mgt_scale.config import ParallelConfig
    from mgt_scale.parallel.checkpointing import apply_activation_checkpointing
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=bool(a.ac)))
    opt = build_optimizer(model, TrainConfig())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    y = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)

    def step() -> float:
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    base = _rss_mb()
    step()  # warm-up: allocates the optimizer moments
    times, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    n = count_parameters(model)
    fixed = 3 * n * 4 / 2**20  # gradients + two Adam moments, fp32
    return {"depth": a.depth, "ac": a.ac, "params": n, "base_mb": base, "peak_mb": peak,
            "step_delta_mb": peak - base, "fixed_mb": fixed, "act_mb": peak - base - fixed,
            "step_s": statistics.median(times), "loss": losses[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="50,100,200")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--residual", default="mgt")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ac", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0

    rows = []
    for depth in [int(d) for d in a.depths.split(",")]:
        for ac in (0, 1):
            cmd = [sys.executable, __file__, "--worker", "--depth", str(depth), "--ac", str(ac),
                   "--d-model", str(a.d_model), "--heads", str(a.heads), "--vocab", str(a.vocab),
                   "--seq", str(a.seq), "--batch", str(a.batch), "--residual", a.residual,
                   "--steps", str(a.steps), "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"# depth {depth} ac {ac}: {r}", file=sys.stderr, flush=True)
    print(f"d_model {a.d_model}, heads {a.heads}, d_ff {4 * a.d_model}, vocab {a.vocab}, seq {a.seq}, "
          f"batch {a.batch}, residual {a.residual}, fp32, CPU, {a.threads} thread(s)\n")
    print("| depth | params | AC | peak RSS (MB) | training peak over baseline (MB) | of which grads+Adam (MB) | "
          "step time (s) | loss | AC/no-AC training peak | AC/no-AC activations | AC/no-AC time |")
    print("|------:|-------:|:--:|------:|------:|------:|------:|------:|------:|------:|------:|")
    by = {(r["depth"], r["ac"]): r for r in rows}
    for (depth, ac), r in sorted(by.items()):
        ref = by[(depth, 0)]
        mem = f"{r['step_delta_mb'] / ref['step_delta_mb']:.2f}" if ac else ""
        act = f"{r['act_mb'] / ref['act_mb']:.2f}" if ac else ""
        tim = f"{r['step_s'] / ref['step_s']:.2f}" if ac else ""
        print(f"| {depth} | {r['params']:,} | {'on' if ac else 'off'} | {r['peak_mb']:.0f} | "
              f"{r['step_delta_mb']:.0f} | {r['fixed_mb']:.0f} | {r['step_s']:.3f} | {r['loss']:.6f} | {mem} | {act} | {tim} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
