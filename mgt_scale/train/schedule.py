# Learning-rate schedule: linear warm-up then cosine decay to min_lr_ratio * lr. A pure function of
# the step, so resuming needs only the step number.
from __future__ import annotations

import math

from mgt_scale.config import TrainConfig


def lr_at(t: TrainConfig, step: int) -> float:
    """LR used for optimizer step `step` (0-based)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
