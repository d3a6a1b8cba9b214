# The NaN / spike guard of the training loop. The engine skips the optimizer update of a step whose
# loss (or gradient) is non-finite on any rank (see ZeroEngine.train_step); this callback counts the
# skips, and after train.max_consecutive_nonfinite consecutive ones either rolls back to the last good
# checkpoint (nonfinite_policy=rollback, Trainer.rollback; the data position moves on, so the offending
# batches are not replayed) or stops with exit_codes.NONFINITE (policy stop, or when rollbacks keep
# failing). Loss spikes (z-score against a running window of recent finite losses above
# train.spike_zscore) are flagged in the step's record (`spike` = the z-score) and logged.
# Two step hooks, declared in step_hooks(): `on_step_end` at Phase.GUARD counts and flags, before anything
# reads the record; `enforce` at Phase.ENFORCE acts, after the metrics callback logged the step.
from __future__ import annotations

import math
from collections import deque

from mgt_scale import exit_codes
from mgt_scale.logs import get_logger
from mgt_scale.train.trainer import Callback, Phase, StopTraining, Trainer

log = get_logger(__name__)

SPIKE_WINDOW = 50  # recent finite losses the running mean/std is taken over
SPIKE_MIN_HISTORY = 8  # no spike verdict before this many losses
MAX_ROLLBACKS = 3  # non-finite rollbacks in one run before giving up with NONFINITE


class NonFiniteGuard(Callback):
    """`train_cfg`: the config's `train` section (max_consecutive_nonfinite, nonfinite_policy,
    spike_zscore). State (checkpointed): the recent losses and the number of rollbacks so far."""
    name = "nonfinite_guard"
    order = Phase.GUARD

    def __init__(self, train_cfg):
        self.train = train_cfg
        self.window: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.rollbacks = 0
        self.pending = False  # too many non-finite steps: enforce() acts on it

    def step_hooks(self):
        return [(Phase.GUARD, self.on_step_end), (Phase.ENFORCE, self.enforce)]

    def state_dict(self) -> dict:
        return {"window": list(self.window), "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(float(v) for v in state.get("window", []))
        self.rollbacks = int(state.get("rollbacks", 0))

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        s, t = trainer.state, self.train
        loss = record.get("loss")
        finite = loss is not None and math.isfinite(loss)
        if record.get("skipped") or not finite:
            s.nonfinite_total += 1
            s.nonfinite_consecutive += 1
            record["skipped"] = True
            record["nonfinite_total"] = s.nonfinite_total
            record["nonfinite_consecutive"] = s.nonfinite_consecutive
            if trainer.is_main:
                log.info(f"non-finite loss/gradient at step {s.step}: update skipped "
                         f"({s.nonfinite_consecutive} consecutive, {s.nonfinite_total} in total)")
            if s.nonfinite_consecutive >= t.max_consecutive_nonfinite:
                self.pending = True  # acted on by enforce(), after the metrics callback logged the step
                record["nonfinite_action"] = t.nonfinite_policy
            return
        s.nonfinite_consecutive = 0
        if len(self.window) >= SPIKE_MIN_HISTORY:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.window) / (len(self.window) - 1))
            z = (loss - mean) / std if std > 0 else 0.0
            if t.spike_zscore and z > t.spike_zscore:
                record["spike"] = z
                if trainer.is_main:
                    log.info(f"loss spike at step {s.step}: {loss:.4f} is {z:.1f} std above the recent mean "
                             f"{mean:.4f}")
        self.window.append(loss)

    def enforce(self, trainer: Trainer, record: dict) -> None:
        """Phase.ENFORCE: roll back or stop when on_step_end found too many non-finite steps."""
        if not self.pending:
            return
        self.pending = False
        s, t = trainer.state, self.train
        what = f"{s.nonfinite_consecutive} consecutive non-finite steps (train.max_consecutive_nonfinite=" \
               f"{t.max_consecutive_nonfinite})"
        if t.nonfinite_policy == "stop":
            raise StopTraining(exit_codes.NONFINITE, f"{what}, nonfinite_policy=stop")
        if self.rollbacks >= MAX_ROLLBACKS:
            raise StopTraining(exit_codes.NONFINITE, f"{what} after {self.rollbacks} rollbacks: giving up")
        if trainer.rollback(record, f"{what} (rollback {self.rollbacks + 1})") is None:
            raise StopTraining(exit_codes.NONFINITE, f"{what}, and no good checkpoint to roll back to")
        self.rollbacks += 1
