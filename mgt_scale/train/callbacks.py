# Standard callbacks of the training loop: metrics (metrics.jsonl + a one-line status on rank 0),
# periodic and final checkpoints, and the run's status file.
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from mgt_scale.train.trainer import Callback, Trainer


def write_json_atomic(path: str | Path, obj: dict) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(p)


class MetricsCallback(Callback):
    """Appends one JSON object per log step to metrics.jsonl (rank 0) and prints a status line:
    step, loss, lr, tokens/s, MFU (when known), grad norm, and the minimum effective rank when the
    monitor measured it this step."""

    def __init__(self, logger, log_interval: int, flops_per_token: float = 0.0, peak_flops: float = 0.0,
                 world_size: int = 1):
        self.logger = logger
        self.log_interval = log_interval
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size

    def on_end(self, trainer: Trainer, exit_code: int, reason: str) -> None:
        self.logger.close()

    def on_stopped_step(self, trainer: Trainer, record: dict) -> None:
        self._log(trainer, record)

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        step = record["step"]
        last = step == trainer.cfg.train.max_steps
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
        self.logger.log(record, step)
        parts = [f"step {step:>6}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                 f"tok/s {record['tokens_per_s']:.0f}", f"gnorm {record['grad_norm']:.3f}"]
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        if "valid_loss" in record and record["valid_loss"] is not None:
            parts.append(f"valid {record['valid_loss']:.4f}")
        if "min_eff_rank_norm" in record:
            parts.append(f"min erank {record['min_eff_rank_norm']:.3f}")
        print(" | ".join(parts), flush=True)


def is_finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
