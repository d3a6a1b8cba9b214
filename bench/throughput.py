# Throughput benchmark, one run, one table per question, ratios side by side on the same machine:
#   1. engine overhead: a plain PyTorch loop vs our trainer in zero3 (1 rank; block and per-module
#      parameter fetch), zero3 (2 ranks), pipeline (2 stages); then the plain loop and the zero3
#      engine's training step in one process, steps interleaved, with our ZeRO-3 fixes and without (section engine1)
#   2. mgt (full, and efficient forms), the published mhc and ddl_delta vs preln: measured step-time ratio
#      next to the FLOP ratio (--kinds picks rows)
#   3. activation checkpointing on vs off: time and peak-RSS ratios
#   4. depth 12 -> 200 at fixed width: time per layer and its slope
#   5. eager vs torch.compile of each block (section compile, not in the default set: compiling takes
#      minutes here)
#   6. tokens/s, model TFLOP/s, MFU and peak memory of preln and the full and efficient MGT (section mfu,
#      bench/throughput_mfu.py; not in the default set: it is the GPU table, --device cuda --precision bf16,
#      see bench/RESULTS.md)
# Every measurement runs in a fresh subprocess (so peak RSS is its own); the residual-kind rows and the
# checkpointing step times put all their models in one process and step each in turn, so that they share
# the machine's state (checkpointing memory is measured in one process per model). Usage:
#   python bench/throughput.py [--quick] [--device cpu|cuda] [--precision fp32|bf16] [--width 128]
#                              [--depth 48] [--sections engines,engine1,kinds,ckpt,depth(,compile,mfu)] [--rounds 3]
#                              [--ckpt-depths 50,100,200] [--malloc retain|glibc-default]
#                              [--heads H] [--vocab V] [--peak-flops F] [--mfu-ckpt off|full|selective]
#                              [--mfu-compile] [--kinds 'mgt full,mhc (n=4),ddl_delta']
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

# glibc's malloc by default hands large freed blocks back to the kernel (trim, and mmap above a moving
# threshold), so memory freed by one step is faulted in and zeroed again by the next. In a process that
# steps several models in turn, how much of that each model pays depends on what the others freed
# before it: at depth 200 the un-checkpointed model measured 12.4 s a step interleaved against 5.5 s
# alone, and 5.9 s interleaved with these settings (bench/RESULTS.md). `--malloc retain` (the default)
# gives every worker process these settings (mallopt(3)'s environment variables), so freed memory stays
# in the process, as a GPU's caching allocator keeps it; `--malloc glibc-default` runs without them.
RETAIN_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


# ------------------------------------------------------------------------------------------------
# worker: a plain PyTorch training loop of the same model (no DeepSpeed)

def build_plain(spec: dict):
    """The model of `spec`, its AdamW and one fixed batch, for a plain PyTorch loop."""
    import torch
    from mgt_scale.config import TrainConfig
    from mgt_scale.model import build_model
    from mgt_scale.train.optim import build_optimizer

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = build_model(cfg_of(spec), device=dev, dtype=dtype)
    if spec.get("ckpt"):  # "full" or "selective" (mgt_scale.model.recompute), one block per segment
        from mgt_scale.config import ParallelConfig
        from mgt_scale.parallel.checkpointing import apply_activation_checkpointing
        apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=True, checkpoint_policy=spec["ckpt"]))
    if spec.get("compile"):  # as `parallel.compile: blocks` does in the trainer: each block's forward
        from mgt_scale.parallel.compile import compile_blocks
        compile_blocks(model)
    opt = build_optimizer(model, TrainConfig())
    x = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), device=dev)
    return model, opt, x


def sync(device) -> None:
    """Wait for the device's queued work, so a timer around it measures the work (a no-op on CPU)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(model, opt, x, clip: float = 0.0) -> float:
    """One forward, backward and optimizer step (gradients clipped to norm `clip` first if > 0); seconds."""
    import torch
    from mgt_scale.model import lm_loss

    sync(x.device)
    tic = time.perf_counter()
    loss = lm_loss(model(x), x)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(x.device)
    return time.perf_counter() - tic


def plain_worker(spec: dict) -> dict:
    import torch

    model, opt, x = build_plain(spec)
    with open("/proc/self/statm") as f:  # libraries + weights, before any activation, gradient or Adam moment
        base_rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    if x.device.type == "cuda":  # not the build's fp32 copy of the weights (build_model casts after init)
        torch.cuda.reset_peak_memory_stats(x.device)
    clip = spec.get("clip", 0.0)
    times = [timed_step(model, opt, x, clip) for _ in range(spec["warmup"] + spec["steps"])][spec["warmup"]:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"step_time": statistics.median(times), "peak_rss_mb": peak, "train_peak_mb": peak - base_rss_mb}
    if x.device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def interleaved_worker(specs: dict) -> dict:
    """All models of `specs` (name -> spec) in one process, one training step of each in turn, so every
    row sees the same machine state; median step time per name (no memory figures: they would mix)."""
    built = {name: build_plain(spec) for name, spec in specs.items()}
    first = next(iter(specs.values()))
    times: dict = {name: [] for name in specs}
    for i in range(first["warmup"] + first["steps"]):
        for name, (model, opt, x) in built.items():
            t = timed_step(model, opt, x)
            if i >= first["warmup"]:
                times[name].append(t)
    return {name: {"step_time": statistics.median(t)} for name, t in times.items()}


def run_plain(spec: dict, mode: str = "one") -> dict:
    """The worker of `mode` (WORKERS: `plain_worker` for "one", ...) run on `spec` in a fresh process."""
    r = subprocess.run([sys.executable, __file__, f"--_worker={mode}", json.dumps(spec)], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# our trainer through `mgt train` (reads the median step_time from metrics.jsonl)

def trainer_sets(spec: dict, mode: str, ranks: int, run_dir: Path) -> dict:
    """`--set` overrides (on configs/tiny_synthetic.yaml) for our trainer on the model and batch of `spec`."""
    sets = {"run.dir": str(run_dir), "model.num_layers": spec["layers"], "model.d_model": spec["width"],
            "model.num_heads": spec["heads"], "model.d_ff": 4 * spec["width"], "model.vocab_size": spec["vocab"],
            "model.max_seq_len": spec["seq"], "model.residual": spec["residual"], "data.synthetic": "random",
            "data.seq_len": spec["seq"], "train.global_batch_size": spec["batch"],
            "train.micro_batch_size": spec["batch"] // (ranks if mode == "zero3" else 1),
            "train.max_steps": spec["warmup"] + spec["steps"], "train.warmup_steps": 0, "train.log_interval": 1,
            "checkpoint.save_at_end": False, "monitor.interval": 0, "parallel.mode": mode,
            "parallel.precision": spec["precision"], "data.valid_fraction_batches": 0}
    if mode == "pipeline":
        sets.update({"parallel.pipeline_stages": ranks, "parallel.zero_stage": 0,
                     "train.micro_batch_size": max(1, spec["batch"] // 4)})
    return sets


def zero3_interleaved_worker(spec: dict) -> dict:
    """The plain loop (clipping, as the trainer does) and `ZeroEngine.train_step` on 1 rank, the step the
    trainer times, in one process, one step of each in turn: the engine's overhead without the scatter
    of separate processes. A second engine runs DeepSpeed's own stage-3 code (our ds_zero3_fixes off, as
    MGT_DS_ZERO3_FIXES=0 would), so their share shows in the same run. DeepSpeed's ZeRO-3 replaces
    `torch.nn.functional.linear` process-wide with its own autograd Function; the plain steps run torch's
    own, as a plain process would."""
    import torch.nn.functional as F
    from mgt_scale.cluster import dist_env
    from mgt_scale.config import load_config
    from mgt_scale.parallel import ds_zero3_fixes
    from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.engine.zero import ZeroEngine

    dist_env.apply(dist_env.derive_dist_env())  # a single process: rank 0 of 1, as `mgt train` sets it up
    init_distributed(import_deepspeed())
    native_linear = F.linear
    model, opt, x = build_plain(spec)
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = trainer_sets(spec, "zero3", 1, Path(tmp) / "run")
        cfg = load_config(REPO / "configs/tiny_synthetic.yaml", [f"{k}={v}" for k, v in sets.items()])
        for name, fixes in (("zero3", True), ("zero3 unfixed", False)):
            ds_zero3_fixes.set_enabled(fixes)  # fp32-master-reuse acts when the optimizer is built
            engines[name] = (ZeroEngine(cfg, plan_batch(cfg, 1), spec["precision"]), fixes)
    engine_linear = F.linear
    times: dict = {"plain": [], **{name: [] for name in engines}}
    for i in range(spec["warmup"] + spec["steps"]):
        F.linear = native_linear
        t_plain = timed_step(model, opt, x, clip=cfg.train.grad_clip)
        F.linear = engine_linear
        if i >= spec["warmup"]:
            times["plain"].append(t_plain)
        for name, (engine, fixes) in engines.items():
            ds_zero3_fixes.set_enabled(fixes)  # gradient-view checks it at every call
            tic = time.perf_counter()
            engine.train_step([(x, x)])
            if i >= spec["warmup"]:
                times[name].append(time.perf_counter() - tic)
    ds_zero3_fixes.set_enabled(True)
    return {name: statistics.median(t) for name, t in times.items()}


WORKERS = {"one": plain_worker, "interleaved": interleaved_worker, "zero3-interleaved": zero3_interleaved_worker}
SECTIONS = ("engines", "engine1", "kinds", "ckpt", "depth", "compile", "mfu")
DEFAULT_SECTIONS = SECTIONS[:-2]  # mfu is the GPU table (on this CPU the kinds table answers its question);
# compile takes minutes to compile on a small CPU


def run_trainer(spec: dict, mode: str, ranks: int, tmp: Path, extra_sets: dict | None = None) -> dict:
    run_dir = tmp / f"{mode}-{ranks}-{spec['layers']}-{len(list(tmp.iterdir()))}"
    sets = trainer_sets(spec, mode, ranks, run_dir)
    sets.update(extra_sets or {})
    cmd = [sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(REPO / "configs/tiny_synthetic.yaml"),
           "--num-ranks", str(ranks)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    if r.returncode:
        raise RuntimeError(f"{mode}/{ranks}: {r.stdout[-1500:]} {r.stderr[-1500:]}")
    from mgt_scale.monitor.loggers import METRICS_FILE
    recs = [json.loads(l) for l in (run_dir / METRICS_FILE).read_text().splitlines()]
    times = [x["step_time"] for x in recs if "step_time" in x and x["step"] > spec["warmup"]]
    return {"step_time": statistics.median(times)}


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"\n### {title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer steps and depths")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=48, help="depth of the engine / mgt-vs-preln comparisons")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=0, help="attention heads (default width / 32)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--peak-flops", type=float, default=0.0,
                    help="mfu: the device's peak FLOP/s (default: a known GPU's dense bf16 peak when running bf16 "
                         "on CUDA, else the FLOP/s of one large matmul measured here)")
    ap.add_argument("--mfu-ckpt", default="off", choices=["off", "full", "selective"],
                    help="mfu: activation checkpointing, one block per segment (a 200-layer model at GPU shapes "
                         "needs it)")
    ap.add_argument("--mfu-compile", action="store_true", help="mfu: torch.compile the models")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated subset of the tables to run: {','.join(SECTIONS)} (engine1: the zero3 "
                         "engine in one process with the plain loop)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="engine, depth and mfu rows: interleaved repetitions (best kept); residual-kind rows: "
                         "steps x rounds (default 3, --quick 1)")
    ap.add_argument("--ckpt-depths", default="", help="depths of the checkpointing table (default 50,100,200; "
                                                        "--quick 50,200)")
    ap.add_argument("--malloc", default="retain", choices=["retain", "glibc-default"],
                    help="glibc malloc settings of the worker processes (see RETAIN_MALLOC_ENV)")
    ap.add_argument("--kinds", default="", help="kinds section: only these rows, comma-separated (e.g. "
                    "'mgt full,mhc (n=4),ddl_delta'; preln always)")
    ap.add_argument("--_worker", default="", choices=["", *WORKERS])
    ap.add_argument("_spec", nargs="?", default="")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        ap.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args._worker:
        print(json.dumps(WORKERS[args._worker](json.loads(args._spec))))
        return
    if args.malloc == "retain":  # inherited by every worker and trainer process started from here on
        os.environ.update(RETAIN_MALLOC_ENV)
    steps, warm = (4, 2) if args.quick else (8, 3)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.ckpt_depths = args.ckpt_depths or ("50,200" if args.quick else "50,100,200")
    base = dict(layers=args.depth, width=args.width, heads=args.heads or max(1, args.width // 32), vocab=args.vocab,
                seq=args.seq, batch=args.batch, residual="mgt", device=args.device, precision=args.precision,
                steps=steps, warmup=warm)
    print(f"# throughput bench: {args.device} {args.precision}, width {args.width}, depth {args.depth}, "
          f"seq {args.seq}, batch {args.batch}, median of {steps} steps after {warm} warm-up; cores {os.cpu_count()}; "
          f"malloc {args.malloc}")
    out: list[str] = []
    if "engines" in sections:
        engines_table(args, base, out)
    if "engine1" in sections:
        engine_inprocess_table(args, base, out)
    if "kinds" in sections:
        kinds_table(args, base, out)
    if "ckpt" in sections:
        ckpt_table(args, base, steps, out)
    if "depth" in sections:
        depth_table(args, base, steps, out)
    if "compile" in sections:
        compile_table(args, base, out)
    if "mfu" in sections:
        from throughput_mfu import mfu_table
        mfu_table(args, base, out)


def cfg_of(spec: dict):
    from mgt_scale.config import MGTConfig, ModelConfig
    return ModelConfig(num_layers=spec["layers"], d_model=spec["width"], num_heads=spec["heads"],
                       d_ff=4 * spec["width"], vocab_size=spec["vocab"], max_seq_len=spec["seq"],
                       residual=spec["residual"], mgt=MGTConfig(**spec.get("mgt", {})))


def best_of_rounds(rounds: int, measure: dict) -> dict:
    """Run every measurement `rounds` times, round-robin (so slow spells of this shared VM hit all rows
    alike), and keep each row's fastest median: interference only ever adds time."""
    best: dict = {}
    for _ in range(rounds):
        for name, fn in measure.items():
            try:
                r = fn()
            except RuntimeError as e:  # its last line: the exception (a worker's traceback ends with it)
                lines = [l for l in str(e).splitlines() if l.strip()] or ["(no message)"]
                r = {"error": lines[-1].strip()[:160]}
            if name not in best or "error" in best[name] or r.get("step_time", 1e9) < best[name]["step_time"]:
                best[name] = r
    return best


def engines_table(args, base, out) -> None:
    from mgt_scale.config import TrainConfig
    tok = args.batch * args.seq
    # the plain loop does the trainer's work: it clips the gradient norm to train.grad_clip (the trainer
    # runs the default), as DeepSpeed does for the trainer
    clip = TrainConfig().grad_clip
    runs = {("plain PyTorch loop", 1): lambda: run_plain(dict(base, clip=clip))}  # (row name, ranks) -> measurement
    with tempfile.TemporaryDirectory() as tmp:
        for mode, ranks, extra, label in (("zero3", 1, {}, ""),
                                          ("zero3", 1, {"parallel.zero3_fetch": "module"},
                                           " (per-module fetch, DeepSpeed's default)"),
                                          ("zero3", 2, {}, ""), ("pipeline", 2, {}, "")):
            name = f"mgt train {mode}{label}"
            runs[(name, ranks)] = lambda m=mode, r=ranks, e=extra: run_trainer(base, m, r, Path(tmp), e)
        best = best_of_rounds(args.rounds, runs)
    ref = best[("plain PyTorch loop", 1)]["step_time"]
    rows = []
    for name, ranks in runs:
        r = best[(name, ranks)]
        rows.append([name, ranks, "failed", r["error"], ""] if "error" in r else
                    [name, ranks, r["step_time"], tok / r["step_time"], r["step_time"] / ref])
    out.append(table(f"Engine overhead (same model and global batch; best of {args.rounds} interleaved rounds)",
                     ["engine", "ranks", "step s", "tokens/s", "x plain"], rows))
    print(out[-1], flush=True)


def engine_inprocess_table(args, base, out) -> None:
    tok = args.batch * args.seq
    steps = base["steps"] * args.rounds
    r = run_plain(dict(base, steps=steps), mode="zero3-interleaved")
    rows = [["plain PyTorch loop", r["plain"], tok / r["plain"], 1.0],
            ["zero3 train_step", r["zero3"], tok / r["zero3"], r["zero3"] / r["plain"]],
            ["zero3 train_step, DeepSpeed's own code (our ZeRO-3 fixes off)", r["zero3 unfixed"],
             tok / r["zero3 unfixed"], r["zero3 unfixed"] / r["plain"]]]
    out.append(table(f"Engine overhead in one process (1 rank; plain loop and ZeroEngine.train_step, one step of "
                     f"each in turn, median of {steps} each)", ["engine", "step s", "tokens/s", "x plain"], rows))
    print(out[-1], flush=True)


def kinds_table(args, base, out) -> None:
    from mgt_scale.train.flops import flops_per_token
    ref = {"fused": False}
    r16, r16t = {"proj_rank": 16}, {"proj_rank": 16, "beta_shape": "token"}
    # default rows: the fused path (eager); "reference": the paper's formulas op by op
    variants = {"preln": dict(base, residual="preln"), "mgt full": base, "mgt full, reference": dict(base, mgt=ref),
                "mgt low-rank r=16": dict(base, mgt=r16),
                "mgt low-rank r=16, token beta": dict(base, mgt=r16t),
                "mgt low-rank r=16, token beta, reference": dict(base, mgt=dict(r16t, **ref)),
                "mhc_gate": dict(base, residual="mhc_gate"), "ddl": dict(base, residual="ddl"),
                "mhc (n=4)": dict(base, residual="mhc"), "ddl_delta": dict(base, residual="ddl_delta")}
    if args.kinds:  # a subset of the rows (preln, the reference, always)
        wanted = ["preln", *(k.strip() for k in args.kinds.split(",") if k.strip() != "preln")]
        unknown = [k for k in wanted if k not in variants]
        if unknown:
            sys.exit(f"--kinds: unknown row(s) {unknown}; known: {list(variants)}")
        variants = {k: variants[k] for k in wanted}
    steps = base["steps"] * args.rounds
    best = run_plain({name: dict(spec, steps=steps) for name, spec in variants.items()}, mode="interleaved")
    f_pre = flops_per_token(cfg_of(variants["preln"]), args.seq)
    t_pre = best["preln"]["step_time"]
    rows = [[name, best[name]["step_time"], best[name]["step_time"] / t_pre,
             flops_per_token(cfg_of(spec), args.seq) / f_pre] for name, spec in variants.items()]
    out.append(table(f"Residual kind cost at width {args.width}, depth {args.depth} (plain loop; all models in one "
                     f"process, one step of each in turn, median of {steps} steps each)",
                     ["residual", "step s", "time / preln", "FLOPs / preln"], rows))
    print(out[-1], flush=True)


def compile_table(args, base, out) -> None:
    """Eager vs torch.compile of each block (`parallel.compile: blocks`, inductor), every model in one process,
    steps interleaved (the compiled models compile in the warm-up steps). Until commit 9c1b504 the C++ CPU
    kernel of the MGT update ran beside them (bench/RESULTS.md section 6)."""
    r16t = {"proj_rank": 16, "beta_shape": "token"}
    variants = {}
    for name, spec in (("preln", dict(base, residual="preln")), ("mgt full", base),
                       ("mgt low-rank r=16, token beta", dict(base, mgt=r16t))):
        variants[f"{name}, eager"] = spec
        variants[f"{name}, compile"] = dict(spec, compile=True)
    steps = base["steps"] * args.rounds
    best = run_plain({name: dict(spec, steps=steps) for name, spec in variants.items()}, mode="interleaved")
    t_pre = best["preln, eager"]["step_time"]
    rows = []
    for name in variants:
        t, eager_t = best[name]["step_time"], best[name.rsplit(", ", 1)[0] + ", eager"]["step_time"]
        rows.append([name, t, t / t_pre, t / eager_t])
    out.append(table(f"Eager vs torch.compile of each block at width {args.width}, depth {args.depth} (plain loop; "
                     f"all models in one process, one step of each in turn, median of {steps} steps each)",
                     ["model, path", "step s", "time / preln eager", "x eager"], rows))
    print(out[-1], flush=True)


def ckpt_table(args, base, steps, out) -> None:
    """Step times from one process with the three models' steps interleaved (separate processes, one pass
    each, gave 1.24x and 1.47x for the same code: bench/RESULTS.md); peak memory from one process per
    model, since a shared process would mix the peaks."""
    rows = []
    for depth in (int(d) for d in args.ckpt_depths.split(",")):
        specs = {"off": dict(base, layers=depth), "full": dict(base, layers=depth, ckpt="full"),
                 "selective": dict(base, layers=depth, ckpt="selective")}
        times = run_plain(specs, mode="interleaved")
        mem = {name: run_plain(spec) for name, spec in specs.items()}
        off_t, off_m = times["off"]["step_time"], mem["off"]
        key = "peak_gpu_mb" if "peak_gpu_mb" in off_m else "train_peak_mb"  # on a GPU its allocator's peak
        for policy in ("full", "selective"):
            on_t, on_m = times[policy]["step_time"], mem[policy]
            rows.append([depth, policy, off_t, on_t, on_t / off_t, off_m[key], on_m[key], on_m[key] / off_m[key],
                         on_m["peak_rss_mb"] / off_m["peak_rss_mb"]])
    what = ("peak GPU memory allocated during training, one process per model" if args.device.startswith("cuda")
            else "peak RSS over the RSS before the first step, one process per model, i.e. activations + "
                 "gradients + Adam moments")
    out.append(table("Activation checkpointing (mgt, plain loop; times: the models' steps interleaved in one "
                     f"process; training peak = {what})",
                     ["depth", "policy", "off s", "on s", "time ratio", "off MB", "on MB", "training-peak ratio",
                      "whole-process RSS ratio"], rows))
    print(out[-1], flush=True)


def depth_table(args, base, steps, out) -> None:
    """One process per depth, `args.rounds` rounds round-robin, fastest median kept (`best_of_rounds`):
    single passes of 4 steps put depth 48 at 1.16 to 1.59 s in three runs on this VM."""
    depths = (12, 48, 200) if args.quick else (12, 24, 48, 100, 200)
    best = best_of_rounds(args.rounds, {d: lambda d=d: run_plain(dict(base, layers=d, steps=max(2, steps // 2)))
                                        for d in depths})
    failed = {d: r["error"] for d, r in best.items() if "error" in r}
    if failed:
        raise SystemExit(f"depth table: runs failed at depths {failed}")
    rows, xs, ys = [], [], []
    for depth in depths:
        t = best[depth]["step_time"]
        rows.append([depth, t, 1000 * t / depth])
        xs.append(depth)
        ys.append(t)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    out.append(table(f"Depth scaling (mgt, width {args.width}; best of {args.rounds} rounds); linear fit: "
                     f"{1000 * slope:.2f} ms per layer, intercept {1000 * (my - slope * mx):.1f} ms",
                     ["depth", "step s", "ms per layer"], rows))
    print(out[-1], flush=True)


if __name__ == "__main__":
    main()
