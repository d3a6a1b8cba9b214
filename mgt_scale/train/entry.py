# `mgt train` / launch/pretrain.py: parse arguments, load the config, derive the distributed
# environment (deepspeed launcher, srun, torchrun or a single process), build the run (train/build.py), run the
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
from mgt_scale.logs import get_logger, setup_logging

log = get_logger(__name__)


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
    log.error(msg)
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
    log.info("launching: " + " ".join(cmd))
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
    setup_logging(rank=denv.rank, world=denv.world_size)
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
        # a launched rank's shape from its DistEnv: under srun LOCAL_WORLD_SIZE is exported only by apply() below
        shape = shape or gpu_profile.shape_from_env(world, denv.local_world_size if _launched() else None)
        ds_json = deepspeed_config(cfg, plan, precision, profile, shape)  # the one the engine gets (build)
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
    return run(cfg, args, denv, plan, precision, ds_json)


def run(cfg: Config, args, denv, plan, precision: str, ds_config: dict) -> int:
    """_run, and any exception it raises ends as failure.crashed says: traceback on stderr, status.json
    `failed` with the exit code and cause, exit_codes.NO_SPACE for a full disk, else CRASH."""
    try:
        return _run(cfg, args, denv, plan, precision, ds_config)
    except (Exception, KeyboardInterrupt) as e:
        from mgt_scale.train.failure import crashed
        return crashed(e, Path(cfg.run.dir), denv.rank)


def _run(cfg: Config, args, denv, plan, precision: str, ds_config: dict) -> int:
    """build (train/build.py) -> resume -> Trainer.run -> status.json. `ds_config`: the DeepSpeed JSON
    main validated (and --dry-run prints), the one the engine initialises DeepSpeed with."""
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

    from mgt_scale.train.build import InputError, build, resume
    try:
        run = build(cfg, plan, precision, denv, ds_config)
        resume(run, args.resume)
    except InputError as e:
        return _fail(run_dir, rank, str(e))
    trainer = run.trainer
    code, reason = trainer.run()
    run.loader.close()
    if rank == 0:
        summary = {"exit_code": code, "reason": reason, "step": trainer.state.step}
        if code == exit_codes.FINISHED:
            summary["valid_loss"] = trainer.final_valid_loss  # evaluated by the loop, also in metrics.jsonl
        _write_status(run_dir, "finished" if code == exit_codes.FINISHED else "stopped", code, reason, summary)
        log.info(f"run {'finished' if code == 0 else 'stopped'} ({reason}) at step {trainer.state.step}; "
                 f"exit code {code}")
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
            log.warning(f"process group teardown failed: {e}")


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
