# Standard callbacks of the training loop: metrics (metrics.jsonl + a one-line status on rank 0 with
# progress, elapsed time and ETA), periodic and final checkpoints, and the run's status file.
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mgt_scale.logs import get_logger
from mgt_scale.train.trainer import Callback, Phase, Trainer

log = get_logger(__name__)


def write_json_atomic(path: str | Path, obj: dict) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(p)


def format_duration(seconds: float) -> str:
    """A duration a person reads at a glance: 45s, 3m12s, 2h05m, 3d04h."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def eta_seconds(step: int, max_steps: int, mean_step_time: float | None) -> float | None:
    """Seconds until `max_steps` at `mean_step_time` per step; None while no mean is known."""
    if mean_step_time is None:
        return None
    return max(0, max_steps - step) * mean_step_time


def progress_text(step: int, max_steps: int, elapsed: float, eta: float | None) -> tuple[str, str]:
    """(the status line's first field, its last field): `step 40/200 (20%)` and
    `elapsed 1m05s | eta 3m12s` (`eta --` until a mean step time is known)."""
    pct = 100.0 * step / max_steps if max_steps else 100.0
    head = f"step {step:>{len(str(max_steps))}}/{max_steps} ({pct:.0f}%)"
    tail = f"elapsed {format_duration(elapsed)} | eta {'--' if eta is None else format_duration(eta)}"
    return head, tail


class MetricsCallback(Callback):
    """Appends one JSON object per log step to metrics.jsonl (rank 0) and prints a status line:
    step of max_steps, loss, lr, tokens/s, MFU (when known), grad norm, the validation loss when
    evaluated, the minimum effective rank when the monitor measured it this step, the time since the
    (re)start and an ETA. The ETA uses the mean wall time per step since the end of the first step
    of this (re)start (the first one pays for start-up, compilation and ZeRO-3's first gathers), so it
    includes checkpoints, probes and evaluations; a rolled-back step counts as a step done."""
    name = "metrics"
    order = Phase.METRICS

    def __init__(self, logger, log_interval: int, flops_per_token: float = 0.0, peak_flops: float = 0.0,
                 world_size: int = 1):
        self.logger = logger
        self.log_interval = log_interval
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self._first_step_end: float | None = None  # wall time at the end of this (re)start's first step
        self._steps_since_first = 0

    def mean_step_time(self) -> float | None:
        if self._first_step_end is None or self._steps_since_first == 0:
            return None
        return (time.time() - self._first_step_end) / self._steps_since_first

    def _count_step(self) -> None:
        if self._first_step_end is None:
            self._first_step_end = time.time()
        else:
            self._steps_since_first += 1

    def on_end(self, trainer: Trainer, exit_code: int, reason: str) -> None:
        self.logger.close()

    def on_evaluate(self, trainer: Trainer, record: dict) -> None:
        if not trainer.is_main:
            return
        self.logger.log(record, record["step"])
        if record.get("valid_loss") is not None:
            head, _ = progress_text(record["step"], trainer.max_steps, 0.0, None)
            log.info(f"{head} | valid {record['valid_loss']:.4f}")

    def on_stopped_step(self, trainer: Trainer, record: dict) -> None:
        self._count_step()
        self._log(trainer, record)

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        self._count_step()
        step = record["step"]
        last = step == trainer.max_steps
        if not (step % self.log_interval == 0 or step == 1 or last or "valid_loss" in record):
            return
        self._log(trainer, record)

    def _log(self, trainer: Trainer, record: dict) -> None:
        step = record["step"]
        if not trainer.is_main:
            return
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak_flops * self.world_size)
        record["elapsed"] = time.time() - trainer.start_time
        max_steps = trainer.max_steps
        eta = eta_seconds(step, max_steps, self.mean_step_time())
        if eta is not None:
            record["eta"] = eta
        self.logger.log(record, step)
        head, tail = progress_text(step, max_steps, record["elapsed"], eta)
        parts = [head, f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                 f"tok/s {record['tokens_per_s']:.0f}", f"gnorm {record['grad_norm']:.3f}"]
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        if "valid_loss" in record and record["valid_loss"] is not None:
            parts.append(f"valid {record['valid_loss']:.4f}")
        if "min_eff_rank_norm" in record:
            parts.append(f"min erank {record['min_eff_rank_norm']:.3f}")
        parts.append(tail)
        log.info(" | ".join(parts))
