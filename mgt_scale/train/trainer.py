# The training loop, kept small: it steps the engine and hands each step's record to callbacks
# (non-finite guard, monitor, metrics, checkpoints, preemption) that plug into it instead of growing it.
# Its state is explicit: `Trainer.state_dict()` is the trainer's own counters, the loader's position and
# every callback's `state_dict()` by name; it goes into each checkpoint's client state and comes back with
# one `load_state_dict()`. Callbacks run in their declared `order` (see `Phase`), never by list position.
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Optional

from mgt_scale import exit_codes
from mgt_scale.logs import get_logger
from mgt_scale.parallel.topology import BatchPlan
from mgt_scale.train.schedule import lr_at

log = get_logger(__name__)


class StopTraining(Exception):
    """Raised by a callback to end the run with an exit code (preemption, collapse alarm, ...)."""

    def __init__(self, exit_code: int, reason: str):
        super().__init__(reason)
        self.exit_code = exit_code
        self.reason = reason


class Phase(IntEnum):
    """The declared order of the step-end hooks (lower runs first); a callback may use any int between.
    GUARD      counts a non-finite step and flags a loss spike in the record, before anything reads it;
    MONITOR    probes the geometry, raises collapse alarms, rolls back on one;
    METRICS    logs the record (console, metrics.jsonl, W&B, TensorBoard): every step that happened is
               logged, including the one that triggers a rollback or a stop below;
    ENFORCE    acts on what GUARD counted (too many non-finite steps: roll back, or stop), once logged;
    CHECKPOINT saves every checkpoint.interval steps (not right after a rollback);
    PREEMPTION a signal, the kill-switch file or the wall-time budget: checkpoint and stop."""
    GUARD = 100
    MONITOR = 200
    METRICS = 300
    ENFORCE = 400
    CHECKPOINT = 500
    PREEMPTION = 600


class Callback:
    """Hook points of the loop. `record` is the step's metrics dict; callbacks may add keys to it
    (additions of earlier hooks are visible to later ones).

    `name` is unique among a trainer's callbacks: the key of its state in the checkpoint. `order` places
    `on_step_end` (and on_start / on_evaluate / on_end, which run in the same order). A callback that acts
    at two points of the step declares them in `step_hooks()` (the non-finite guard: GUARD and ENFORCE).
    `state_dict()` / `load_state_dict()`: what must survive a restart (default: nothing)."""
    name: str = "callback"
    order: int = Phase.METRICS

    def step_hooks(self) -> list[tuple[int, Callable[["Trainer", dict], None]]]:
        """(order, hook) pairs called at each step end; by default on_step_end at `order`."""
        return [(self.order, self.on_step_end)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", record: dict) -> None: ...

    def on_stopped_step(self, trainer: "Trainer", record: dict) -> None:
        """The step's record when an earlier hook stopped the run at this step (called once for each
        callback with a hook after the one that stopped; no further work such as checkpoints should
        happen here: only bookkeeping)."""

    def on_evaluate(self, trainer: "Trainer", record: dict) -> None:
        """A final evaluation outside a training step (a finished run started again): the record
        holds `step` and `valid_loss` only. Comes before on_end, while the loggers are open."""

    def on_end(self, trainer: "Trainer", exit_code: int, reason: str) -> None: ...


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0


class Trainer:
    """`train_cfg`: the config's `train` section; `manager`: the CheckpointManager a rollback loads from
    (None: rollbacks find no checkpoint)."""

    def __init__(self, train_cfg, plan: BatchPlan, engine, loader, run_dir: str, rank: int,
                 callbacks: Optional[list[Callback]] = None, valid_batches=None, manager=None):
        self.train, self.plan, self.engine, self.loader = train_cfg, plan, engine, loader
        self.run_dir, self.rank, self.manager = run_dir, rank, manager
        self.valid_batches = valid_batches
        self.state = TrainState()
        self.start_time = time.time()
        # the validation loss after the last step (None: no validation batches, or interrupted); set by
        # run() before the callbacks' on_end, so that the metrics sinks still log it
        self.final_valid_loss: Optional[float] = None
        self.callbacks = list(callbacks or [])

    @property
    def callbacks(self) -> list[Callback]:
        return self._callbacks

    @callbacks.setter
    def callbacks(self, cbs: list[Callback]) -> None:
        """Sorted by (order, name); names must be unique (they key the checkpointed state)."""
        names = [cb.name for cb in cbs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"callback names must be unique, got {dup} more than once")
        self._callbacks = sorted(cbs, key=lambda cb: (int(cb.order), cb.name))
        hooks = [(int(order), cb.name, i, cb, fn) for cb in self._callbacks
                 for i, (order, fn) in enumerate(cb.step_hooks())]
        self._hooks = [(cb, fn) for _, _, _, cb, fn in sorted(hooks, key=lambda h: h[:3])]

    def step_hook_names(self) -> list[str]:
        """`name.hook` in the order the step-end hooks run (what a test or a reader checks)."""
        return [f"{cb.name}.{fn.__name__}" for cb, fn in self._hooks]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def max_steps(self) -> int:
        return self.train.max_steps

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the loop needs to continue exactly: the step, the non-finite counters, the data
        position and each callback's state by name. This is the checkpoint's client state (the manager
        adds RNG, config and versions); the keys `loader` and `trainer` are those of the older format."""
        s = self.state
        return {"step": s.step, "loader": self.loader.state_dict(),
                "trainer": {"nonfinite_total": s.nonfinite_total, "nonfinite_consecutive": s.nonfinite_consecutive},
                "callbacks": {cb.name: cb.state_dict() for cb in self._callbacks}}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict(). Also reads the client state of checkpoints written before the
        `callbacks` key, where each callback's state sat at the top level under its name (`monitor`,
        `nonfinite_guard`)."""
        self.state.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        ts = state.get("trainer") or {}
        self.state.nonfinite_total = int(ts.get("nonfinite_total", 0))
        self.state.nonfinite_consecutive = int(ts.get("nonfinite_consecutive", 0))
        saved = state.get("callbacks")
        if saved is None:  # the older layout
            saved = {cb.name: state[cb.name] for cb in self._callbacks if isinstance(state.get(cb.name), dict)}
        for cb in self._callbacks:
            if saved.get(cb.name):
                cb.load_state_dict(saved[cb.name])

    def rollback(self, record: dict, why: str) -> Optional[int]:
        """Restore weights and optimizer (and RNG) from the newest good checkpoint, for the non-finite
        guard and the collapse monitor alike. The step goes back to the checkpoint's; the data position
        moves on (the batches that led here are not replayed) and the callbacks keep their live state
        (counts of rollbacks and alarms escalate). Marks the record with `rollback_to` (the checkpoint
        callback does not save a state just restored). Returns the step, or None with no checkpoint."""
        say = log.info if self.is_main else (lambda *a, **k: None)
        tag_dir = self.manager.find_resume(log=say) if self.manager is not None else None
        if tag_dir is None:
            return None
        state = self.manager.load(self.engine, tag_dir, log=say)
        self.state.step = int(state["step"])
        self.state.nonfinite_consecutive = 0
        record["rollback_to"] = self.state.step
        if self.is_main:
            log.info(f"{why}: rolled back to {tag_dir.name} (step {self.state.step}); data position kept at "
                     f"{self.loader.consumed_samples} samples")
        return self.state.step

    # -- the loop ----------------------------------------------------------------------------------
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
                    log.info("evaluation interrupted by a stop request")
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
        for cb in self._callbacks:
            cb.on_evaluate(self, record)

    def train_step(self, step: int, micro_batches):
        """One optimizer step of the engine (`step`: the steps completed before it). A method of its
        own so that the fault hooks of the tests (tests/fault_hooks) can wrap it."""
        return self.engine.train_step(micro_batches)

    def _step_end(self, record: dict) -> None:
        for i, (cb, fn) in enumerate(self._hooks):
            try:
                fn(self, record)
            except StopTraining as stop:
                # the step happened: callbacks with later hooks (metrics) still see its record
                record["stopped"] = stop.reason
                told = set()
                for later, _ in self._hooks[i + 1:]:
                    if id(later) not in told:
                        told.add(id(later))
                        later.on_stopped_step(self, record)
                raise

    def run(self) -> tuple[int, str]:
        """Train until max_steps or a callback stops the run. Returns (exit code, reason)."""
        t = self.train
        code, reason = exit_codes.FINISHED, "finished"
        last_record = None
        try:
            for cb in self._callbacks:
                cb.on_start(self)
            while self.state.step < t.max_steps:
                step = self.state.step
                lr = lr_at(t, step)
                self.engine.set_lr(lr)
                tic = time.perf_counter()
                micro_batches = self.loader.next_step()
                result = self.train_step(step, micro_batches)
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
                self._step_end(record)
        except StopTraining as stop:
            code, reason = stop.exit_code, stop.reason
        if code == exit_codes.FINISHED:
            self._final_evaluation(last_record)
        for cb in self._callbacks:
            cb.on_end(self, code, reason)
        return code, reason
