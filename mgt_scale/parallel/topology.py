# The one place that does the batch arithmetic: micro batch x gradient accumulation x data-parallel
# size = global batch, tokens per step, and world size = pipeline stages x data-parallel size; the
# pipeline bubble (fewer micro batches than stages is refused, a large bubble warned about).
# Errors say which number to change.
from __future__ import annotations

from dataclasses import dataclass

from mgt_scale.config import Config, ConfigError


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    pipeline_stages: int
    data_parallel: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def describe(self) -> str:
        return (f"world={self.world_size} = stages {self.pipeline_stages} x dp {self.data_parallel}; "
                f"global batch {self.global_batch} = micro {self.micro_batch} x accum {self.grad_accum} "
                f"x dp {self.data_parallel}; {self.tokens_per_step} tokens/step")


def plan_batch(cfg: Config, world_size: int) -> BatchPlan:
    """Check the topology against the world size and derive gradient accumulation."""
    p, t = cfg.parallel, cfg.train
    stages = p.pipeline_stages if p.mode == "pipeline" else 1
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if world_size % stages:
        raise ConfigError(
            f"parallel.pipeline_stages={stages} does not divide the world size {world_size}: "
            f"launch a multiple of {stages} ranks or change parallel.pipeline_stages")
    dp = world_size // stages
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not micro_batch_size ({t.micro_batch_size}) x "
            f"grad_accum x data_parallel ({dp}): set train.global_batch_size to a multiple of {per_step} "
            f"or change train.micro_batch_size")
    accum = t.global_batch_size // per_step
    if stages > 1 and accum < stages:
        raise ConfigError(
            f"parallel.pipeline_stages={stages} with {accum} micro batch(es) per step (train.global_batch_size="
            f"{t.global_batch_size} / (micro_batch_size {t.micro_batch_size} x data-parallel {dp})): a pipeline "
            f"needs at least as many micro batches as stages, else stages idle most of the step (bubble "
            f"{bubble_fraction(stages, accum):.0%}); set train.global_batch_size >= {stages * per_step} or "
            f"lower parallel.pipeline_stages")
    return BatchPlan(world_size=world_size, pipeline_stages=stages, data_parallel=dp,
                     micro_batch=t.micro_batch_size, grad_accum=accum,
                     global_batch=t.global_batch_size, seq_len=cfg.data.seq_len)


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a 1F1B pipeline step: (stages - 1) / (micro batches + stages - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def bubble_warning(cfg: Config, plan: BatchPlan) -> str:
    """A warning line when the pipeline bubble exceeds parallel.bubble_warn_fraction, else ""."""
    if plan.pipeline_stages < 2:
        return ""
    bubble = bubble_fraction(plan.pipeline_stages, plan.grad_accum)
    if bubble <= cfg.parallel.bubble_warn_fraction:
        return ""
    return (f"warning: pipeline bubble {bubble:.0%} ({plan.pipeline_stages} stages, {plan.grad_accum} micro batches "
            f"per step; above parallel.bubble_warn_fraction={cfg.parallel.bubble_warn_fraction}): raise "
            f"train.global_batch_size or lower train.micro_batch_size for more micro batches per step")
