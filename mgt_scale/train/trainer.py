# The training loop, kept small: it steps the engine and hands each step's record to callbacks
# (metrics logging, checkpointing, monitoring, preemption) that plug into it instead of growing it.
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from mgt_scale import exit_codes
from mgt_scale.config import Config
from mgt_scale.parallel.topology import BatchPlan
from mgt_scale.train.schedule import lr_at


class StopTraining(Exception):
    """Raised by a callback to end the run with an exit code (preemption, collapse alarm, ...)."""

    def __init__(self, exit_code: int, reason: str):
        super().__init__(reason)
        self.exit_code = exit_code
        self.reason = reason


class Callback:
    """Hook points of the loop. `record` is the step's metrics dict; callbacks may add keys to it
    (earlier callbacks' additions are visible to later ones)."""

    def on_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", record: dict) -> None: ...

    def on_stopped_step(self, trainer: "Trainer", record: dict) -> None:
        """The step's record when an earlier callback stopped the run at this step (no further
        work such as checkpoints should happen here: only bookkeeping)."""

    def on_evaluate(self, trainer: "Trainer", record: dict) -> None:
        """A final evaluation outside a training step (a finished run started again): the record
        holds `step` and `valid_loss` only. Comes before on_end, while the loggers are open."""

    def on_end(self, trainer: "Trainer", exit_code: int, reason: str) -> None: ...


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    extra: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: Config, plan: BatchPlan, engine, loader, run_dir: str, rank: int,
                 callbacks: Optional[list[Callback]] = None, valid_batches=None):
        self.cfg, self.plan, self.engine, self.loader = cfg, plan, engine, loader
        self.run_dir, self.rank = run_dir, rank
        self.callbacks = list(callbacks or [])
        self.valid_batches = valid_batches
        self.state = TrainState()
        self.start_time = time.time()
        # the validation loss after the last step (None: no validation batches, or interrupted); set by
        # run() before the callbacks' on_end, so that the metrics sinks still log it
        self.final_valid_loss: Optional[float] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def evaluate(self) -> Optional[float]:
        """Mean validation loss, one batch at a time so that a stop request (signal, kill-switch)
        interrupts a long evaluation: every rank agrees before each batch; None when interrupted."""
        if not self.valid_batches:
            return None
        from mgt_scale.parallel.collectives import any_rank
        from mgt_scale.train.preemption import stop_requested
        losses = []
        for batch in self.valid_batches:
            if any_rank(stop_requested(self.run_dir)):
                if self.is_main:
                    print("evaluation interrupted by a stop request", flush=True)
                return None
            losses.append(self.engine.eval_loss([batch]))
        return sum(losses) / len(losses)

    def _final_evaluation(self, last_record: Optional[dict]) -> None:
        """Collective (every rank finishes together). The last step's record already holds the
        evaluation when the loop ran that step; otherwise (started again at max_steps) evaluate now
        and hand the record to the callbacks' on_evaluate."""
        if last_record is not None and last_record["step"] == self.state.step and "valid_loss" in last_record:
            self.final_valid_loss = last_record.get("valid_loss")
            return
        if not self.valid_batches:
            return
        self.final_valid_loss = self.evaluate()
        record = {"step": self.state.step, "valid_loss": self.final_valid_loss}
        for cb in self.callbacks:
            cb.on_evaluate(self, record)

    def run(self) -> tuple[int, str]:
        """Train until max_steps or a callback stops the run. Returns (exit code, reason)."""
        t = self.cfg.train
        code, reason = exit_codes.FINISHED, "finished"
        last_record = None
        try:
            for cb in self.callbacks:
                cb.on_start(self)
            while self.state.step < t.max_steps:
                step = self.state.step
                lr = lr_at(t, step)
                self.engine.set_lr(lr)
                tic = time.perf_counter()
                micro_batches = self.loader.next_step()
                result = self.engine.train_step(micro_batches, inject_nan=step in t.fault_inject_nan_steps)
                dt = time.perf_counter() - tic
                self.state.step = step + 1
                record = {"step": self.state.step, "loss": result.loss, "lr": lr,
                          "grad_norm": result.grad_norm, "step_time": dt,
                          "tokens_per_s": self.plan.tokens_per_step / dt if dt > 0 else 0.0,
                          "consumed_samples": self.loader.consumed_samples}
                if result.skipped:
                    record["skipped"] = True
                last = self.state.step == t.max_steps
                if (t.eval_interval and self.state.step % t.eval_interval == 0) or (last and self.valid_batches):
                    # the final evaluation is part of the last step's record (metrics.jsonl, console,
                    # W&B, TensorBoard); a rollback at that step evaluates again when it is reached
                    record["valid_loss"] = self.evaluate()
                last_record = record
                for cb in self.callbacks:
                    try:
                        cb.on_step_end(self, record)
                    except StopTraining as stop:
                        # the step happened: later callbacks (metrics) still see its record
                        record["stopped"] = stop.reason
                        for later in self.callbacks[self.callbacks.index(cb) + 1:]:
                            later.on_stopped_step(self, record)
                        raise
        except StopTraining as stop:
            code, reason = stop.exit_code, stop.reason
        if code == exit_codes.FINISHED:
            self._final_evaluation(last_record)
        for cb in self.callbacks:
            cb.on_end(self, code, reason)
        return code, reason
