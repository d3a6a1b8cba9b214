# The engine interface (issue #29): what the trainer, the checkpoint manager, the monitor and the
# converters call on an engine, declared once as a Protocol. `ZeroEngine` (mgt_scale.engine.zero, ZeRO
# stages 1-3) and `PipelineEngine` (mgt_scale.engine.pipeline) implement it; callers never branch on the
# mode: what differs between engines (data-parallel coordinates, the geometry probe, gathering the whole
# model) is a method here.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    loss: float  # mean over the global batch (all micro batches, all data-parallel ranks)
    grad_norm: float
    skipped: bool = False


@runtime_checkable
class Engine(Protocol):
    """A model wrapped for distributed training by one parallelism."""

    mode: str  # the config's `parallel.mode` it implements: "zero" or "pipeline"

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped model (this rank's stages in pipeline mode)."""

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel rank: which micro batches it is handed (the loader's shard)."""

    @property
    def dp_size(self) -> int:
        """The number of data-parallel replicas."""

    def set_lr(self, lr: float) -> None: ...

    def train_step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """Forward/backward every micro batch and one optimizer step; a non-finite loss skips the update."""

    def eval_loss(self, batches: Sequence[Batch], mask_fn: Optional[Callable] = None) -> float:
        """Mean loss over `batches` (and all data-parallel ranks), no gradients."""

    def save(self, save_dir: str, tag: str, client_state: dict) -> None: ...

    def load(self, load_dir: str, tag: str, universal: bool = False) -> Optional[dict]:
        """Load model and optimizer; returns the client state saved with them (None: nothing loaded).
        `universal`: the directory holds a DeepSpeed universal checkpoint (another world size)."""

    def probe_geometry(self, tokens: torch.Tensor, step: int, center: bool = False) -> dict[str, Any]:
        """One geometry.jsonl record of the residual stream on `tokens` (collective: every rank calls it
        with the same tokens and gets the same record)."""

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model as an fp32 state dict with canonical names (`embed.*`, `blocks.{i}.*`,
        `head.*`), on every rank (collective)."""

    def load_consolidated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a canonical fp32 state dict (weights only; collective). Strict: every parameter present,
        no unknown key."""


def accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def load_checkpoint(ds_engine, load_dir: str, tag: str, universal: bool) -> Optional[dict]:
    """DeepSpeed's load_checkpoint with its universal-checkpoint switch set for this one call."""
    conf = ds_engine._config
    before = conf.load_universal_checkpoint
    conf.load_universal_checkpoint = universal
    try:
        _, client_state = ds_engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
    finally:
        conf.load_universal_checkpoint = before
    return client_state


def refresh_fp32_params(optimizer) -> None:
    """After the weights were written directly: let the optimizer's fp32 master copy follow them."""
    inner = getattr(optimizer, "optimizer", None)
    for o in (optimizer, inner):
        if o is not None and hasattr(o, "refresh_fp32_params"):
            o.refresh_fp32_params()
            break
