# Step 3 of bench/gpu_check.sh: the ZeRO-3 engine's training speed on one GPU at a deep bf16 shape, one row
# per configuration, each in its own process (its own peak memory and compile caches): the GPU profile
# (`parallel.profile: gpu`) against the settings before it (`cpu`), `parallel.compile: blocks` against eager,
# the efficient MGT (rank 16, one beta per token) and the full form against pre-LN. Rows run in the order of
# ROWS until `--budget` seconds are spent (the device lends about 10 minutes a call); a row that does not
# finish in time is reported as such. Prints one JSON line per row and a table: step time, tokens/s, MFU
# (mgt_scale.train.flops: model FLOPs over the GPU's dense bf16 peak), peak GPU memory allocated.
# The engine runs as `mgt train` builds it (ZeroEngine, activation checkpointing one block per segment,
# AdamW), on random tokens, without data loading, logging or checkpoints. Usage:
#   python bench/gpu_perf.py [--budget 300] [--quick]      (--quick: a small fp32 shape, for a CPU dry run)
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EFFICIENT = ["model.mgt.proj_rank=16", "model.mgt.beta_shape=token"]
ROWS = {  # name -> overrides; in priority order (the budget may end the list early)
    "mgt r=16 token beta, gpu profile, eager": ["model.residual=mgt", *EFFICIENT, "parallel.profile=gpu"],
    "mgt r=16 token beta, gpu profile, compile": ["model.residual=mgt", *EFFICIENT, "parallel.profile=gpu",
                                                  "parallel.compile=blocks"],
    "preln, gpu profile, eager": ["model.residual=preln", "parallel.profile=gpu"],
    "mgt r=16 token beta, cpu profile, eager": ["model.residual=mgt", *EFFICIENT, "parallel.profile=cpu"],
    "preln, gpu profile, compile": ["model.residual=preln", "parallel.profile=gpu", "parallel.compile=blocks"],
    "mgt full, gpu profile, compile": ["model.residual=mgt", "parallel.profile=gpu", "parallel.compile=blocks"],
}
# 100 blocks of width 1024 (8 heads of 128, d_ff 4096), seq 2048, micro batch 4, vocabulary 32768: pre-LN and
# the efficient MGT 1.33 B parameters, the full MGT 1.75 B (at about 20 bytes each under ZeRO-3 bf16 on one GPU,
# weights, fp32 master weights, AdamW moments and gradients: 27 and 35 GB); full checkpointing as at depth 200
SHAPE = ["model.num_layers=100", "model.d_model=1024", "model.num_heads=8", "model.d_ff=4096",
         "model.vocab_size=32768", "model.max_seq_len=2048", "data.seq_len=2048", "train.micro_batch_size=4",
         "train.global_batch_size=4", "parallel.precision=bf16"]
QUICK = ["model.num_layers=8", "model.d_model=128", "model.num_heads=4", "model.d_ff=512", "model.vocab_size=2048",
         "model.max_seq_len=128", "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=4",
         "parallel.precision=fp32"]
COMMON = ["data.synthetic=random", "parallel.activation_checkpointing=true", "monitor.interval=0"]


def worker(overrides: list[str], steps: int, warmup: int) -> dict:
    """Build the ZeRO-3 engine of `overrides` on one rank, time `warmup + steps` training steps."""
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    import torch

    from mgt_scale.config import load_config
    from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.engine.zero import ZeroEngine
    from mgt_scale.train.flops import flops_per_token, peak_flops_per_device

    init_distributed(import_deepspeed())
    cfg = load_config(None, overrides)
    precision = cfg.parallel.precision
    tic = time.perf_counter()
    engine = ZeroEngine(cfg, plan_batch(cfg, 1), precision)
    build_s = time.perf_counter() - tic
    dev = engine.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    b, t, v = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)
    times, first_s = [], 0.0
    for i in range(warmup + steps):
        batch = [(torch.randint(0, v, (b, t), generator=g), torch.randint(0, v, (b, t), generator=g))]
        if cuda:
            torch.cuda.synchronize(dev)
        tic = time.perf_counter()
        engine.train_step(batch)  # the loss's float() waits for the device
        if cuda:
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - tic
        if i == 0:
            first_s = dt  # compiles, when compiling
        if i >= warmup:
            times.append(dt)
    step = statistics.median(times)
    tokens = b * t / step
    peak = peak_flops_per_device(cfg.train.peak_flops, precision)
    fpt = flops_per_token(cfg.model, t)
    return {"step_s": step, "tokens_per_s": tokens, "mfu": tokens * fpt / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None,
            "build_s": round(build_s, 1), "first_step_s": round(first_s, 1), "flops_per_token": fpt,
            "device": torch.cuda.get_device_name(dev) if cuda else "cpu"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all rows together")
    ap.add_argument("--quick", action="store_true", help="small fp32 shape (CPU dry run)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per row (default 6; quick 3)")
    ap.add_argument("--_worker", default="")
    args = ap.parse_args()
    steps, warmup = args.steps or (3 if args.quick else 6), (1 if args.quick else 2)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker), steps, warmup)), flush=True)
        return 0
    shape = QUICK if args.quick else SHAPE
    deadline = time.monotonic() + args.budget
    print(f"# gpu_perf: {' '.join(shape)}; {warmup} warm-up + {steps} timed steps a row; budget {args.budget:.0f} s",
          flush=True)
    results: dict = {}
    for name, rows in ROWS.items():
        left = deadline - time.monotonic()
        if left < 20:
            results[name] = {"error": "not run: budget spent"}
            continue
        cmd = [sys.executable, __file__, "--_worker", json.dumps(COMMON + shape + rows), "--steps", str(steps)]
        if args.quick:
            cmd.append("--quick")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
            lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
            if r.returncode or not lines:
                tail = [l for l in (r.stderr or r.stdout).splitlines() if l.strip()][-1:] or ["(no output)"]
                results[name] = {"error": f"exit {r.returncode}: {tail[0].strip()[:200]}"}
            else:
                results[name] = json.loads(lines[-1])
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"not finished in the {left:.0f} s left of the budget"}
        print(json.dumps({"row": name, **results[name]}), flush=True)
    print_table(results)
    return 0 if all("error" not in r for r in results.values()) else 1


def print_table(results: dict) -> None:
    """Each row against its eager twin (compile rows) and against pre-LN of the same profile and path."""
    def ref(name: str, **swap) -> dict:
        for old, new in swap.items():
            name = name.replace(old, new)
        return results.get(name, {})

    print("\n| row | step s | tokens/s | MFU | peak GiB | first step s | x eager | x preln |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | | |")
            continue
        eager = ref(name, **{", compile": ", eager"}).get("step_s")
        pre = ref("preln," + name.split(",", 1)[1]).get("step_s")
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {fmt(r['mfu'], '.1%')} | "
              f"{fmt(r['peak_gib'], '.1f')} | {r['first_step_s']} | "
              f"{fmt(r['step_s'] / eager if eager and 'compile' in name else None, '.3f')} | "
              f"{fmt(r['step_s'] / pre if pre and not name.startswith('preln') else None, '.3f')} |")


if __name__ == "__main__":
    sys.exit(main())
