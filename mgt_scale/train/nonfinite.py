# The NaN / spike guard of the training loop. The engine skips the optimizer update of a step whose
# loss (or gradient) is non-finite on any rank (see ZeroEngine.train_step); this callback counts the
# skips, and after train.max_consecutive_nonfinite consecutive ones either rolls back to the last good
# checkpoint (nonfinite_policy=rollback; the data position moves on, so the offending batches are not
# replayed) or stops with exit_codes.NONFINITE (policy stop, or when rollbacks keep failing). Loss
# spikes (z-score against a running window of recent finite losses above train.spike_zscore) are
# flagged in the step's record (`spike` = the z-score) and printed.
from __future__ import annotations

import math
from collections import deque

from mgt_scale import exit_codes
from mgt_scale.train.trainer import Callback, StopTraining, Trainer

SPIKE_WINDOW = 50  # recent finite losses the running mean/std is taken over
SPIKE_MIN_HISTORY = 8  # no spike verdict before this many losses
MAX_ROLLBACKS = 3  # non-finite rollbacks in one run before giving up with NONFINITE


class NonFiniteGuard(Callback):
    def __init__(self, manager, restored: dict | None = None):
        self.manager = manager
        self.window: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.rollbacks = 0
        self.pending = False
        if restored:
            self.window.extend(float(v) for v in restored.get("window", []))
            self.rollbacks = int(restored.get("rollbacks", 0))

    def enforcer(self) -> Callback:
        """The callback that rolls back / stops; place it after the metrics callback (so the step that
        triggers it is logged) and before the checkpoint callback."""
        guard = self

        class _Enforce(Callback):
            def on_step_end(self, trainer: Trainer, record: dict) -> None:
                if guard.pending:
                    guard.pending = False
                    guard._too_many(trainer, record)

        return _Enforce()

    def state_dict(self) -> dict:
        return {"window": list(self.window), "rollbacks": self.rollbacks}

    def on_start(self, trainer: Trainer) -> None:
        trainer.state_providers = getattr(trainer, "state_providers", {})
        trainer.state_providers["nonfinite_guard"] = self.state_dict

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        s, t = trainer.state, trainer.cfg.train
        loss = record.get("loss")
        finite = loss is not None and math.isfinite(loss)
        if record.get("skipped") or not finite:
            s.nonfinite_total += 1
            s.nonfinite_consecutive += 1
            record["skipped"] = True
            record["nonfinite_total"] = s.nonfinite_total
            record["nonfinite_consecutive"] = s.nonfinite_consecutive
            if trainer.is_main:
                print(f"non-finite loss/gradient at step {s.step}: update skipped "
                      f"({s.nonfinite_consecutive} consecutive, {s.nonfinite_total} in total)", flush=True)
            if s.nonfinite_consecutive >= t.max_consecutive_nonfinite:
                self.pending = True  # acted on by enforcer(), after the metrics callback logged the step
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
                    print(f"loss spike at step {s.step}: {loss:.4f} is {z:.1f} std above the recent mean "
                          f"{mean:.4f}", flush=True)
        self.window.append(loss)

    def _too_many(self, trainer: Trainer, record: dict) -> None:
        s, t = trainer.state, trainer.cfg.train
        what = f"{s.nonfinite_consecutive} consecutive non-finite steps (train.max_consecutive_nonfinite=" \
               f"{t.max_consecutive_nonfinite})"
        if t.nonfinite_policy == "stop":
            raise StopTraining(exit_codes.NONFINITE, f"{what}, nonfinite_policy=stop")
        if self.rollbacks >= MAX_ROLLBACKS:
            raise StopTraining(exit_codes.NONFINITE, f"{what} after {self.rollbacks} rollbacks: giving up")
        tag_dir = self.manager.find_resume(log=print if trainer.is_main else (lambda *a: None))
        if tag_dir is None:
            raise StopTraining(exit_codes.NONFINITE, f"{what}, and no good checkpoint to roll back to")
        state = self.manager.load(trainer.engine, tag_dir)
        self.rollbacks += 1
        record["rollback_to"] = state["step"]
        if trainer.is_main:
            print(f"{what}: rolled back to {tag_dir.name} (step {state['step']}, rollback {self.rollbacks}); "
                  f"data position kept at {trainer.loader.consumed_samples} samples", flush=True)
        s.step = state["step"]
        s.nonfinite_consecutive = 0
