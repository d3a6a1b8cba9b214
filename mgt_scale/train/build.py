# The one place that turns a validated config into the parts of a training run: the data check (the
# tokenizer identity and the vocabulary, once), the process group, the engine, the loader and validation
# batches, the checkpoint manager, the metrics sinks and the trainer with its callbacks. Each part gets
# its own section of the config (Trainer: `train`; MonitorCallback: `monitor`;
# CheckpointCallback: `checkpoint`); only this file, the engine and the checkpoint manager see all of it.
# `resume()` then restores a checkpoint into them with one Trainer.load_state_dict. entry._run is:
# build -> resume -> trainer.run -> status.
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgt_scale.config import Config
from mgt_scale.logs import get_logger

log = get_logger(__name__)


class InputError(Exception):
    """Bad input found while building or resuming (data, checkpoint): the run ends with exit code 2
    and status.json `failed`, with this one-line message."""


@dataclass
class Run:
    cfg: Config
    plan: object
    precision: str
    rank: int
    run_dir: Path
    data_tokenizer: dict
    engine: object = None
    loader: object = None
    valid: list = field(default_factory=list)
    manager: object = None
    logger: object = None  # a MultiLogger, given its sinks by resume() (they truncate at the resumed step)
    trainer: object = None
    checkpoint_cb: object = None

    def say(self, msg: str) -> None:
        """Log on rank 0 only (the others would repeat it)."""
        if self.rank == 0:
            log.info(msg)


def check_data(cfg: Config) -> dict:
    """The identity of the data's tokenizer (recorded in every checkpoint), after checking that the
    vocabulary the data needs fits model.vocab_size. Cheap (manifests only): done before anything is
    built, so that a wrong vocabulary stops the run at once. Raises InputError."""
    from mgt_scale.data import data_tokenizer_identity, dataset_vocab_size
    from mgt_scale.data.shards import DataError
    try:
        identity = data_tokenizer_identity(cfg.data, cfg.model.vocab_size)
        data_vocab = dataset_vocab_size(cfg.data)
    except (DataError, OSError, ValueError) as e:
        raise InputError(str(e)) from None
    if data_vocab is not None and data_vocab > cfg.model.vocab_size:
        where = cfg.data.path or ", ".join(b.path for b in cfg.data.blend)
        raise InputError(f"{where}: tokenizer vocabulary {data_vocab} exceeds model.vocab_size={cfg.model.vocab_size}: "
                         f"set model.vocab_size={data_vocab}")
    return identity


def describe_env(denv, plan, precision: str) -> str:
    """The start-up lines: launcher, ranks, batch plan, precision, process-group backend."""
    import torch.distributed as dist

    from mgt_scale.cluster.dist_env import describe
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    return f"{describe(denv)}\nbatch: {plan.describe()}; precision {precision}; process group backend {backend}"


def build(cfg: Config, plan, precision: str, denv, ds_config: dict) -> Run:
    """Every part of the run, ready to resume and run. Collective (all ranks). Raises InputError.
    `ds_config`: the DeepSpeed JSON of entry.main (validated there, printed by --dry-run)."""
    import torch

    from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed
    run = Run(cfg, plan, precision, denv.rank, Path(cfg.run.dir), check_data(cfg))
    deepspeed = import_deepspeed()
    torch.manual_seed(cfg.train.seed)
    init_distributed(deepspeed, cfg.parallel.dist_timeout_minutes)
    run.say(describe_env(denv, plan, precision))
    patched = {"zero": cfg.parallel.zero_stage == 3, "pipeline": cfg.parallel.zero_stage == 0 and precision == "fp32"}
    if patched[cfg.parallel.mode]:  # the runs our DeepSpeed patches act in (parallel/ds_patches.py)
        from mgt_scale.parallel import ds_patches
        run.say(ds_patches.describe("zero3" if cfg.parallel.mode == "zero" else "pipeline"))

    from mgt_scale.engine import build_engine
    run.engine = engine = build_engine(cfg, plan, precision, ds_config)
    dp_rank, dp_size = engine.dp_rank, engine.dp_size

    from mgt_scale.data import build_train_loader, build_valid_batches, verify_data_once
    from mgt_scale.data.shards import DataError
    from mgt_scale.data.verify_cache import CACHE_NAME
    try:
        verify_data_once(cfg.data,  # once per node, in parallel: the opens below check sizes only; a restart
                         # hashes only shards changed since (checkpoint.verify=full: every shard, every start)
                         cache=None if cfg.checkpoint.verify == "full" else run.run_dir / CACHE_NAME)
        run.loader = build_train_loader(cfg.data, seq_len=cfg.data.seq_len, global_batch=plan.global_batch,
                                        micro_batch=plan.micro_batch, dp_rank=dp_rank, dp_size=dp_size,
                                        vocab_size=cfg.model.vocab_size)
        run.valid = build_valid_batches(cfg.data, cfg.data.seq_len, plan.micro_batch, cfg.data.valid_fraction_batches,
                                        cfg.model.vocab_size)
    except (DataError, OSError, ValueError) as e:
        raise InputError(str(e)) from None

    from mgt_scale.checkpoint.manager import CheckpointManager
    run.manager = CheckpointManager(str(run.run_dir), cfg, run.rank, plan.world_size)
    run.manager.data_tokenizer = run.data_tokenizer
    run.manager.recover_interrupted_saves(log=run.say)

    from mgt_scale.monitor.loggers import MultiLogger
    run.logger = MultiLogger()
    run.trainer = build_trainer(run)
    return run


def build_trainer(run: Run):
    """The trainer and its callbacks (their order is declared by each: trainer.Phase)."""
    from mgt_scale.train.callbacks import MetricsCallback
    from mgt_scale.train.flops import flops_per_token, peak_flops_per_device
    from mgt_scale.train.monitor_callback import MonitorCallback, probe_tokens
    from mgt_scale.train.nonfinite import NonFiniteGuard
    from mgt_scale.train.resume_callbacks import CheckpointCallback, PreemptionCallback
    from mgt_scale.train.trainer import Trainer
    cfg = run.cfg
    run.checkpoint_cb = ckpt = CheckpointCallback(run.manager, cfg.checkpoint)
    callbacks = [
        NonFiniteGuard(cfg.train),
        MonitorCallback(cfg.monitor, lambda: probe_tokens(cfg, cfg.model.vocab_size), run.logger, ckpt),
        MetricsCallback(run.logger, cfg.train.log_interval, flops_per_token(cfg.model, cfg.data.seq_len),
                        peak_flops_per_device(cfg.train.peak_flops, run.precision), run.plan.world_size),
        ckpt,
        PreemptionCallback(ckpt, cfg.train.max_wall_time),
    ]
    return Trainer(cfg.train, run.plan, run.engine, run.loader, str(run.run_dir), run.rank, callbacks=callbacks,
                   valid_batches=run.valid, manager=run.manager)


def resume(run: Run, how: str) -> Optional[Path]:
    """`--resume` (`""`: none, `auto`: the newest good checkpoint, else a checkpoint directory): load the
    checkpoint into the engine and its client state into the trainer (Trainer.load_state_dict), set
    aside what a resumed branch leaves behind, then open the metrics sinks at the resumed step.
    Collective. Returns the checkpoint resumed from, or None. Raises InputError."""
    from mgt_scale.monitor.loggers import build_loggers
    from mgt_scale.checkpoint.manifest import CheckpointError, data_tokenizer_problem
    from mgt_scale.checkpoint.universal import ConversionError
    manager, trainer = run.manager, run.trainer
    resumed = None
    if how:
        tag_dir = manager.find_resume(log=run.say) if how == "auto" else Path(how)
        if how == "auto":  # what it rejected as damaged goes to checkpoints/damaged/
            manager.set_aside_damaged(log=run.say)
        if tag_dir is not None and how != "auto":
            problems = manager.verify(tag_dir)  # collective: each rank hashes its own share
            if problems:
                raise InputError(f"--resume {tag_dir}: checkpoint rejected: " + "; ".join(problems))
        if tag_dir is not None:
            problem, warning = data_tokenizer_problem(tag_dir, run.data_tokenizer)
            if problem:
                raise InputError(problem)
            if warning and run.rank == 0:
                log.warning(warning)
            try:
                state = manager.load(run.engine, tag_dir, log=run.say)
            except ConversionError:
                raise  # the converter failed on a good checkpoint: a crash (exit 1, retried), not bad input
            except CheckpointError as e:
                raise InputError(str(e)) from None
            trainer.load_state_dict(state)
            resumed = tag_dir
            run.say(f"resumed from {tag_dir} at step {state['step']}")
        else:
            run.say("no checkpoint to resume from: starting fresh")
    at = trainer.state.step
    if resumed is not None and manager.holds(resumed, at):
        # a finished run started again, or a requeued job stopped before its first step, must not re-save
        run.checkpoint_cb.mark_saved(at)
    if resumed is not None and how != "auto":
        # auto took the newest good one: anything later is incomplete or damaged, handled as before
        manager.set_aside_newer(at, resumed, log=run.say)
    sinks = build_loggers(run.cfg, run.run_dir, rank=run.rank, resume_step=at if resumed is not None else None)
    run.logger.loggers[:] = sinks.loggers
    return resumed
