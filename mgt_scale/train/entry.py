# `mgt train` / launch/pretrain.py: parse arguments, load the config, derive the distributed
# environment (deepspeed launcher, srun, torchrun or a single process), build data + engine, run the
# loop with its callbacks, and exit with the code of mgt_scale.exit_codes. On one machine with
# --num-ranks N > 1 it re-launches itself under the `deepspeed` launcher.
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mgt_scale import exit_codes
from mgt_scale.config import Config, ConfigError, load_config, save_config, to_dict


def build_parser(prog: str = "mgt train") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train an MGT (or baseline) stack with DeepSpeed.")
    ap.add_argument("--config", required=True, help="YAML run config (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, e.g. --set train.lr=3e-4 (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, then exit")
    ap.add_argument("--nodes", type=int, default=None, metavar="N",
                    help="with --dry-run: plan a GPU job of N nodes (default 1): world size, partition, sizes, the "
                         "DeepSpeed JSON it gets (parallel.profile auto = gpu, precision auto = bf16)")
    ap.add_argument("--gpus-per-node", type=int, default=None, metavar="G", help="with --dry-run: GPUs per node "
                    "of the planned job (default 8)")
    ap.add_argument("--resume", default="", metavar="auto|PATH",
                    help="auto: continue from the newest good checkpoint in run.dir (fresh start if none); "
                         "PATH: a checkpoint directory")
    ap.add_argument("--num-ranks", type=int, default=0,
                    help="on one machine: number of ranks to start with the deepspeed launcher "
                         "(default: 1, or what the launcher already set)")
    # the deepspeed launcher appends --local_rank=N; the rank is taken from the environment instead
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return exit_codes.CONFIG_ERROR


def _launched() -> bool:
    return any(v in os.environ for v in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"))


def local_rank_placement(num_ranks: int, visible: str | None, gpu_count: int) -> list[str]:
    """The deepspeed launcher's arguments that place `num_ranks` ranks on this machine.

    With `--num_gpus N` DeepSpeed takes GPUs 0..N-1 and drops CUDA_VISIBLE_DEVICES (it says it ignores
    it), whether or not N GPUs exist. So: no GPU visible, N CPU ranks (`--num_gpus N`); the GPUs limited
    by CUDA_VISIBLE_DEVICES, the first N of those (`--include localhost:a,b`); else GPUs 0..N-1, and N may
    not exceed the GPUs there are (a rank on a missing GPU fails with "invalid device ordinal")."""
    if gpu_count == 0:
        return ["--num_gpus", str(num_ranks)]
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    available = len(ids) if ids else gpu_count
    if num_ranks > available:
        where = f"CUDA_VISIBLE_DEVICES={visible}" if ids else f"{gpu_count} GPU(s) on this machine"
        raise ValueError(f"--num-ranks {num_ranks}: only {available} GPU(s) to run on ({where}); one rank "
                         "per GPU: lower --num-ranks, or free more GPUs")
    if not ids:
        return ["--num_gpus", str(num_ranks)]
    if not all(i.isdigit() for i in ids[:num_ranks]):
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible}: the deepspeed launcher takes GPU indices, not "
                         "UUIDs; give indices, or start the ranks with your own launcher")
    return ["--include", "localhost:" + ",".join(ids[:num_ranks])]


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start N local ranks with the deepspeed launcher, running this same entry point."""
    from mgt_scale.cluster.dist_env import free_port
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--num-ranks":
            skip = True
            continue
        if a.startswith("--num-ranks="):
            continue
        rest.append(a)
    import torch
    try:
        placement = local_rank_placement(args.num_ranks, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                         torch.cuda.device_count())
    except ValueError as e:
        return _error(str(e))
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher, *placement, "--master_port", str(free_port()), "--no_local_rank",
           "--module", "mgt_scale.train.entry", *rest]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _error(str(e))
    if args.num_ranks > 1 and not _launched() and not args.dry_run:
        return _relaunch(args, argv)

    from mgt_scale.cluster.dist_env import DistEnvError, apply, derive_dist_env
    try:
        denv = derive_dist_env()
    except DistEnvError as e:
        return _error(str(e))
    if _launched() and args.num_ranks > 1 and args.num_ranks != denv.world_size:
        return _error(f"--num-ranks {args.num_ranks} was given, but this process is already rank {denv.rank} of a "
                      f"launched world of {denv.world_size} (launcher '{denv.launcher}' set RANK/WORLD_SIZE or "
                      f"SLURM_PROCID); drop --num-ranks under a launcher, or unset those variables")
    world = denv.world_size if _launched() else max(1, args.num_ranks)
    from mgt_scale.parallel import gpu_profile
    from mgt_scale.parallel.ds_config import deepspeed_config, detect_precision, resolve_precision
    from mgt_scale.parallel.topology import plan_batch
    shape = None
    if args.nodes is not None or args.gpus_per_node is not None:  # a GPU job planned on any machine
        shape = gpu_profile.JobShape(1 if args.nodes is None else args.nodes,
                                     8 if args.gpus_per_node is None else args.gpus_per_node)
        if not args.dry_run or shape.nodes < 1 or shape.gpus_per_node < 1:
            return _error(f"--nodes {shape.nodes} --gpus-per-node {shape.gpus_per_node}: both >= 1, and only with "
                          "--dry-run (a launched job takes its shape from the launcher)")
        world = shape.world_size
    try:
        plan = plan_batch(cfg, world)
        precision = (resolve_precision(cfg.parallel.precision, True, True) if shape
                     else detect_precision(cfg.parallel.precision))
        profile = (gpu_profile.resolve_profile(cfg.parallel.profile, True) if shape
                   else gpu_profile.detect_profile(cfg.parallel.profile))
        shape = shape or gpu_profile.shape_from_env(world)
        ds_json = deepspeed_config(cfg, plan, precision, profile, shape)
    except (ConfigError, ValueError) as e:
        return _error(f"{args.config}: {e}")
    if args.dry_run:
        import yaml
        print("# resolved config\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"# batch plan: {plan.describe()}; precision {precision}")
        print("# plan\n" + "\n".join(gpu_profile.describe(cfg, plan, precision, profile, shape)))
        print("# DeepSpeed config\n" + json.dumps(ds_json, indent=2))
        return 0
    apply(denv)
    return run(cfg, args, denv, plan, precision)


def run(cfg: Config, args, denv, plan, precision: str) -> int:
    """_run, and any exception it raises ends as failure.crashed says: traceback on stderr, status.json
    `failed` with the exit code and cause, exit_codes.NO_SPACE for a full disk, else CRASH."""
    try:
        return _run(cfg, args, denv, plan, precision)
    except (Exception, KeyboardInterrupt) as e:
        from mgt_scale.train.failure import crashed
        return crashed(e, Path(cfg.run.dir), denv.rank)


def _run(cfg: Config, args, denv, plan, precision: str) -> int:
    import warnings
    from mgt_scale.train.preemption import install_signal_handlers
    install_signal_handlers()
    # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, once per step: keep logs readable
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    run_dir = Path(cfg.run.dir)
    rank = denv.rank
    ckdir = run_dir / "checkpoints"
    if rank == 0:
        if not args.resume and ckdir.is_dir() and any(ckdir.iterdir()):
            return _error(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, "
                          "or choose another run.dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _write_status(run_dir, "running", None, "")

    import torch
    from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed
    deepspeed = import_deepspeed()
    from mgt_scale.data import build_train_loader, build_valid_batches, data_tokenizer_identity, dataset_vocab_size
    from mgt_scale.data.shards import DataError

    try:
        data_tokenizer = data_tokenizer_identity(cfg.data, cfg.model.vocab_size)
        data_vocab = dataset_vocab_size(cfg.data)
        if data_vocab is not None and data_vocab > cfg.model.vocab_size:
            where = cfg.data.path or ", ".join(b.path for b in cfg.data.blend)
            return _fail(run_dir, rank, f"{where}: tokenizer vocabulary {data_vocab} exceeds "
                                        f"model.vocab_size={cfg.model.vocab_size}: set model.vocab_size={data_vocab}")
    except (DataError, OSError, ValueError) as e:
        return _fail(run_dir, rank, str(e))

    torch.manual_seed(cfg.train.seed)
    init_distributed(deepspeed, cfg.parallel.dist_timeout_minutes)
    if rank == 0:
        print(describe_env(denv, plan, precision), flush=True)
        patched = {"zero": cfg.parallel.zero_stage == 3, "pipeline": cfg.parallel.zero_stage == 0 and precision == "fp32"}
        if patched[cfg.parallel.mode]:  # the runs our DeepSpeed patches act in (parallel/ds_patches.py)
            from mgt_scale.parallel import ds_patches
            print(ds_patches.describe("zero3" if cfg.parallel.mode == "zero" else "pipeline"), flush=True)
    from mgt_scale.engine import build_engine
    engine = build_engine(cfg, plan, precision)
    dp_rank, dp_size = engine.dp_rank, engine.dp_size
    try:
        from mgt_scale.data import verify_data_once
        verify_data_once(cfg.data,  # once per node, in parallel: the opens below check sizes only; a restart
                         # hashes only shards changed since (checkpoint.verify=full: every shard, every start)
                         cache=None if cfg.checkpoint.verify == "full" else Path(run_dir) / ".data_verified.json")
        loader = build_train_loader(cfg.data, seq_len=cfg.data.seq_len, global_batch=plan.global_batch,
                                    micro_batch=plan.micro_batch, dp_rank=dp_rank, dp_size=dp_size,
                                    vocab_size=cfg.model.vocab_size)
        valid = build_valid_batches(cfg.data, cfg.data.seq_len, plan.micro_batch, cfg.data.valid_fraction_batches,
                                    cfg.model.vocab_size)
    except (DataError, OSError, ValueError) as e:
        return _fail(run_dir, rank, str(e))

    from mgt_scale.train.callbacks import MetricsCallback
    from mgt_scale.train.checkpoint import CheckpointManager
    from mgt_scale.train.ckpt_format import CheckpointError
    from mgt_scale.train.resume_callbacks import CheckpointCallback, PreemptionCallback
    from mgt_scale.train.trainer import Trainer

    manager = CheckpointManager(str(run_dir), cfg, rank, plan.world_size)
    manager.data_tokenizer = data_tokenizer
    manager.recover_interrupted_saves(log=print if rank == 0 else (lambda *a, **k: None))
    trainer = Trainer(cfg, plan, engine, loader, str(run_dir), rank, valid_batches=valid)
    resumed_from = None
    if args.resume:
        log = print if rank == 0 else (lambda *a, **k: None)
        tag_dir = manager.find_resume(log=log) if args.resume == "auto" else Path(args.resume)
        if args.resume == "auto":  # what it rejected as damaged goes to checkpoints/damaged/
            manager.set_aside_damaged(log=log)
        if tag_dir is not None and args.resume != "auto":
            problems = manager.verify(tag_dir)  # collective: each rank hashes its own share
            if problems:
                return _fail(run_dir, rank, f"--resume {tag_dir}: checkpoint rejected: " + "; ".join(problems))
        if tag_dir is not None:
            from mgt_scale.train.ckpt_format import data_tokenizer_problem
            problem, warning = data_tokenizer_problem(tag_dir, data_tokenizer)
            if problem:
                return _fail(run_dir, rank, problem)
            if warning and rank == 0:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            try:
                state = manager.load(engine, tag_dir, log=log)
            except CheckpointError as e:
                return _fail(run_dir, rank, str(e))
            trainer.state.step = state["step"]
            loader.load_state_dict(state["loader"])
            ts = state.get("trainer", {})
            trainer.state.nonfinite_total = int(ts.get("nonfinite_total", 0))
            trainer.state.nonfinite_consecutive = int(ts.get("nonfinite_consecutive", 0))
            trainer.restored_client_state = state
            resumed_from = tag_dir
            if rank == 0:
                print(f"resumed from {tag_dir} at step {state['step']}", flush=True)
        elif rank == 0:
            print("no checkpoint to resume from: starting fresh", flush=True)
    from mgt_scale.monitor.loggers import build_loggers
    from mgt_scale.train.flops import flops_per_token, peak_flops_per_device
    from mgt_scale.train.monitor_callback import MonitorCallback
    restored = getattr(trainer, "restored_client_state", None) or {}
    logger = build_loggers(cfg, run_dir, rank=rank, resume_step=restored.get("step"))
    at = trainer.state.step
    on_disk = resumed_from is not None and manager.holds(resumed_from, at)
    # a finished run started again, or a requeued job stopped before its first step, must not re-save
    ckpt_cb = CheckpointCallback(manager, saved_step=at if on_disk else -1)
    if resumed_from is not None and args.resume != "auto":
        # auto took the newest good one: anything later is incomplete or damaged, handled as before
        manager.set_aside_newer(at, resumed_from, log=log)
    monitor_cb = MonitorCallback(cfg, logger, ckpt_cb, manager, restored.get("monitor"))
    from mgt_scale.train.nonfinite import NonFiniteGuard
    guard = NonFiniteGuard(manager, restored.get("nonfinite_guard"))
    trainer.callbacks = [guard, monitor_cb,
                         MetricsCallback(logger, cfg.train.log_interval, flops_per_token(cfg.model, cfg.data.seq_len),
                                         peak_flops_per_device(cfg.train.peak_flops, precision), plan.world_size),
                         guard.enforcer(), ckpt_cb, PreemptionCallback(ckpt_cb, cfg.train.max_wall_time)]
    code, reason = trainer.run()
    loader.close()
    if rank == 0:
        summary = {"exit_code": code, "reason": reason, "step": trainer.state.step}
        if code == exit_codes.FINISHED:
            summary["valid_loss"] = trainer.final_valid_loss  # evaluated by the loop, also in metrics.jsonl
        _write_status(run_dir, "finished" if code == exit_codes.FINISHED else "stopped", code, reason, summary)
        print(f"run {'finished' if code == 0 else 'stopped'} ({reason}) at step {trainer.state.step}; "
              f"exit code {code}", flush=True)
    _leave_process_group()
    return code


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter exits. A rank that exits with gloo's threads
    still up can abort in a C++ destructor ("terminate called without an active exception", exit -6)
    after a clean finish, which makes the launcher report a finished run as failed (seen in CI)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # teardown must not change the run's exit code
            print(f"warning: process group teardown failed: {e}", file=sys.stderr, flush=True)


def describe_env(denv, plan, precision: str) -> str:
    import torch.distributed as dist

    from mgt_scale.cluster.dist_env import describe
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    return f"{describe(denv)}\nbatch: {plan.describe()}; precision {precision}; process group backend {backend}"


def _write_status(run_dir: Path, state: str, code, reason: str, extra: dict | None = None) -> None:
    from mgt_scale.train.callbacks import write_json_atomic
    write_json_atomic(run_dir / "status.json", dict(extra or {}, state=state, exit_code=code, reason=reason,
                                                    time=time.time()))


def _fail(run_dir: Path, rank: int, msg: str) -> int:
    if rank == 0 and run_dir.is_dir():
        _write_status(run_dir, "failed", exit_codes.CONFIG_ERROR, msg)
    return _error(msg)


def exit_rank(code: int) -> None:
    """End a launched rank with `code` once everything durable is written (checkpoints, status.json,
    metrics: the loggers are closed by then), skipping the interpreter's teardown. Even after
    `_leave_process_group`, a rank has aborted in a C++ destructor at exit ("terminate called without an
    active exception", -6) in pipeline mode (fresh-clone CI, test_pipeline_sigkill_then_resume_is_exact),
    and the launcher then reports a finished run as failed. Both entry points end here: `python -m
    mgt_scale.train.entry` (what `mgt train` launches) and launch/pretrain.py (SLURM, `deepspeed`)."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))  # as sys.exit: None is 0


if __name__ == "__main__":
    exit_rank(main())
