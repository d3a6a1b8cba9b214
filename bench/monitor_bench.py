# Benchmark of the geometry probe's cost: times mgt_scale.monitor.metrics.layer_geometry on a probe
# batch of [4, 64, 128] hidden states for models of 8, 48 and 100 blocks (num_blocks + 1 residual
# states: every block input plus the final output), i.e. float64 SVDs of 4 x (L + 1) matrices of
# 64 x 128, all in one batched svdvals call. For reference it also times a per-sequence Python loop.
"""Usage: python bench/monitor_bench.py [--layers 8 48 100] [--batch 4 --tokens 64 --width 128]
[--repeats 5] [--device cpu|cuda] [--no-loop]. Prints a markdown table (median ms per probe)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mgt_scale.monitor.metrics import hidden_geometry, layer_geometry


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, kernels, LAPACK workspace)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 48, 100], help="numbers of blocks")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-loop", action="store_true", help="skip the per-sequence loop reference")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"probe=[{args.batch}, {args.tokens}, {args.width}] float32 input, float64 SVD, median of {args.repeats}")
    print()
    print("| blocks | residual states | matrices | batched ms/probe | ms per state | per-sequence loop ms |")
    print("|---|---|---|---|---|---|")
    for num_blocks in args.layers:
        hs = [torch.randn(args.batch, args.tokens, args.width, generator=gen).to(device) for _ in range(num_blocks + 1)]
        batched = _time(lambda: layer_geometry(hs), args.repeats, device)
        loop = "-"
        if not args.no_loop:
            ms = _time(lambda: [hidden_geometry(h[b:b + 1]) for h in hs for b in range(h.shape[0])],
                       max(1, args.repeats // 2), device)
            loop = f"{ms:.1f}"
        n = len(hs)
        print(f"| {num_blocks} | {n} | {n * args.batch} | {batched:.1f} | {batched / n:.2f} | {loop} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
