# Callbacks that make deaths cheap: periodic/final checkpoints, and preemption (signal, kill-switch,
# wall-time budget) -> checkpoint at the step boundary -> exit code PREEMPTED. A checkpoint's client
# state is Trainer.state_dict() (step, counters, data position, every callback's state by name).
from __future__ import annotations

import os
import time
from pathlib import Path

from mgt_scale import exit_codes
from mgt_scale.logs import get_logger
from mgt_scale.checkpoint.manager import CheckpointManager
from mgt_scale.parallel.collectives import any_rank
from mgt_scale.train.preemption import StopConditions
from mgt_scale.train.trainer import Callback, Phase, StopTraining, Trainer

log = get_logger(__name__)


class CheckpointCallback(Callback):
    """Saves every `checkpoint.interval` steps and at the end (`checkpoint.save_at_end`); `ckpt_cfg`: the
    config's `checkpoint` section."""
    name = "checkpoint"
    order = Phase.CHECKPOINT

    def __init__(self, manager: CheckpointManager, ckpt_cfg):
        self.manager, self.ckpt_cfg = manager, ckpt_cfg
        self.last_saved = -1
        self.last_save_time = 0.0

    def mark_saved(self, step: int) -> None:
        """This run's checkpoints already hold `step` (the one it resumed from). Saving it again would
        rewrite the same state for nothing (CheckpointManager.save keeps the completed one until the new
        one is complete, so it would not be lost)."""
        self.last_saved = step

    def save(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if step == self.last_saved:
            return
        tic = time.time()
        path = self.manager.save(trainer.engine, step, trainer.state_dict())
        self.last_save_time = time.time() - tic
        self.last_saved = step
        if trainer.is_main:
            how = " (writing in the background)" if self.manager.pending() == step else ""
            log.info(f"checkpoint saved: {path} ({self.last_save_time:.1f}s){how}")

    def wait(self, trainer: Trainer) -> None:
        """Completes a save in flight (checkpoint.async_save) before the run stops."""
        pending = self.manager.pending()
        self.manager.wait()
        if pending is not None and trainer.is_main:
            log.info(f"checkpoint step {pending} complete")

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        n = self.ckpt_cfg.interval
        self.manager.poll()  # a background save whose writes are done on every rank completes here
        if "rollback_to" in record:
            return  # the state was just restored from a checkpoint
        if n and trainer.state.step % n == 0 and trainer.state.step < trainer.max_steps:
            self.save(trainer)

    def on_end(self, trainer: Trainer, exit_code: int, reason: str) -> None:
        if exit_code == exit_codes.FINISHED and self.ckpt_cfg.save_at_end:
            self.save(trainer)
        self.wait(trainer)


class PreemptionCallback(Callback):
    name = "preemption"
    order = Phase.PREEMPTION

    def __init__(self, checkpoint: CheckpointCallback, max_wall_time: float):
        self.checkpoint = checkpoint
        self.max_wall_time = max_wall_time
        self.cond: StopConditions | None = None

    def on_start(self, trainer: Trainer) -> None:
        self.cond = StopConditions(trainer.run_dir, self.max_wall_time, trainer.start_time)
        pids = Path(trainer.run_dir) / "pids"  # so that tests and wrappers can signal the rank processes
        pids.mkdir(parents=True, exist_ok=True)
        (pids / f"rank{trainer.rank}.pid").write_text(f"{os.getpid()}\n")
        self._check(trainer, 0.0, record=None)  # a signal during start-up

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        self._check(trainer, record["step_time"], record)

    def _check(self, trainer: Trainer, step_time: float, record) -> None:
        self.cond.save_time = self.checkpoint.last_save_time
        reason = self.cond.local_reason(step_time)
        if not any_rank(bool(reason)):
            return
        if trainer.state.step >= trainer.max_steps:
            return  # finishing anyway: the final checkpoint follows
        reason = reason or "another rank asked to stop"
        if trainer.is_main:
            log.info(f"preempted ({reason}): checkpointing step {trainer.state.step}")
        self.checkpoint.save(trainer)
        self.checkpoint.wait(trainer)  # the write in flight, if any, completes before the exit
        raise StopTraining(exit_codes.PREEMPTED, f"preempted: {reason}")
