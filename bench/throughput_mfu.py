# The MFU section of bench/throughput.py (`--sections mfu`): tokens/s, model TFLOP/s, MFU and peak memory
# of preln, the full and efficient MGT, mhc and ddl_delta in the plain loop, against a known GPU's dense
# bf16 peak, `--peak-flops`, or the measured rate of one large matmul here. Run it through throughput.py,
# which owns the arguments and the worker processes.
from __future__ import annotations

import time

from throughput import best_of_rounds, cfg_of, run_plain, sync, table


def matmul_rate(device: str, precision: str) -> float:
    """FLOP/s of one large square matmul here, best of 6: MFU's denominator when no peak is given or known
    (CPUs), so that MFU then reads as a fraction of what this device's matmul reaches."""
    import torch
    dev = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 4096 if dev.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(dev)
        tic = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - tic)
    return 2.0 * n ** 3 / best


def mfu_peak(args) -> tuple[float, str]:
    """The peak FLOP/s MFU is taken against, and where it came from."""
    if args.peak_flops:
        return args.peak_flops, "--peak-flops"
    if args.device.startswith("cuda") and args.precision == "bf16":
        import torch
        from mgt_scale.train.flops import peak_flops_per_device
        peak = peak_flops_per_device(0.0)
        if peak:
            return peak, f"dense bf16 peak of {torch.cuda.get_device_name()}"
    return matmul_rate(args.device, args.precision), f"measured {args.precision} matmul rate of this device"


def mfu_table(args, base, out) -> None:
    """Plain loop, each model in its own process (peak memory is its own), best of `args.rounds`. MFU counts
    the model's FLOPs (mgt_scale.train.flops, the PaLM/Megatron convention): recomputation under
    checkpointing is not counted, so checkpointing lowers MFU. The models train in `--precision` throughout
    (bf16: parameters and AdamW states in bf16, no fp32 master copy)."""
    from mgt_scale.train.flops import flops_per_token
    extra = {"ckpt": None if args.mfu_ckpt == "off" else args.mfu_ckpt, "compile": args.mfu_compile}
    variants = {"preln": dict(base, residual="preln", **extra), "mgt full": dict(base, **extra),
                "mgt low-rank r=16, token beta": dict(base, mgt={"proj_rank": 16, "beta_shape": "token"}, **extra),
                "mhc (n=4)": dict(base, residual="mhc", **extra), "ddl_delta": dict(base, residual="ddl_delta", **extra)}
    peak, source = mfu_peak(args)
    best = best_of_rounds(args.rounds, {name: lambda s=spec: run_plain(s) for name, spec in variants.items()})
    tok = args.batch * args.seq
    f_pre = flops_per_token(cfg_of(variants["preln"]), args.seq)
    t_pre = best["preln"].get("step_time")
    rows = []
    for name, spec in variants.items():
        r, fpt = best[name], flops_per_token(cfg_of(spec), args.seq)
        if "error" in r:
            rows.append([name, "failed", r["error"], "", "", "", "", ""])
            continue
        rate = tok / r["step_time"]
        rows.append([name, r["step_time"], rate, rate * fpt / 1e12, rate * fpt / peak,
                     r.get("peak_gpu_mb", r["train_peak_mb"]), r["step_time"] / t_pre if t_pre else "", fpt / f_pre])
    out.append(table(f"MFU at depth {args.depth}, width {args.width}, {base['heads']} heads, seq {args.seq}, batch "
                     f"{args.batch}, {args.precision}, checkpointing {args.mfu_ckpt}"
                     f"{', torch.compile' if args.mfu_compile else ''} (plain loop, one process per row, best of "
                     f"{args.rounds}); peak {peak / 1e12:.3f} TFLOP/s ({source})",
                     ["residual", "step s", "tokens/s", "model TFLOP/s", "MFU",
                      "peak MB (GPU allocated; CPU training RSS)", "time / preln", "FLOPs / preln"], rows))
    print(out[-1], flush=True)
