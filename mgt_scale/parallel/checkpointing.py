# Activation checkpointing applied from outside the model (as torchtitan's `apply_ac`): segments of
# `parallel.checkpoint_every_layers` consecutive layers are recomputed in the backward pass, with the
# policy `parallel.checkpoint_policy` ("full", or "selective": keep the outputs of the matmuls that narrow
# their input; mgt_scale.model.recompute). The model's own forward knows nothing of it.
#  - MGTModel (zero mode, and the plain model of tests and benches): its `blocks` (a BlockStack) becomes a
#    CheckpointedBlockStack in place (the instance's class is swapped, as torch.nn.utils.parametrize
#    does), whose forward runs each segment of k blocks under torch's non-reentrant checkpoint. No module
#    is wrapped or renamed, so parameter names, checkpoints and ZeRO-3's per-block hooks (each block is
#    still called as a module) stay as they are, and a deep copy of the model stays checkpointed.
#  - A DeepSpeed PipelineModule (pipeline mode): DeepSpeed's own segmentation of a stage's layers
#    (`activation_checkpoint_interval`) with our checkpoint function; set before `deepspeed.initialize`,
#    which reads both.
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from mgt_scale.config import ParallelConfig
from mgt_scale.model.recompute import POLICIES, checkpoint_segment
from mgt_scale.model.transformer import BlockStack


def apply_activation_checkpointing(module: nn.Module, parallel: ParallelConfig) -> bool:
    """Checkpoint `module` (a MGTModel, a BlockStack, or a DeepSpeed PipelineModule of our stack) as
    `parallel` says; nothing when `parallel.activation_checkpointing` is off. Returns whether it did."""
    if not parallel.activation_checkpointing:
        return False
    every, policy = parallel.checkpoint_every_layers, parallel.checkpoint_policy
    if every < 1:
        raise ValueError(f"parallel.checkpoint_every_layers {every}: expected >= 1")
    if policy not in POLICIES:
        raise ValueError(f"parallel.checkpoint_policy {policy!r}: expected one of {POLICIES}")
    if hasattr(module, "activation_checkpoint_interval") and hasattr(module, "forward_funcs"):
        module.activation_checkpoint_interval = every  # DeepSpeed PipelineModule: a stage's layers
        module.activation_checkpoint_func = functools.partial(checkpoint_segment, policy=policy)
        return True
    blocks = module if isinstance(module, BlockStack) else getattr(module, "blocks", None)
    if not isinstance(blocks, BlockStack):
        raise TypeError(f"{type(module).__name__}: cannot apply activation checkpointing (no BlockStack "
                        "`blocks` and not a PipelineModule)")
    checkpoint_blocks(blocks, every, policy)
    return True


class CheckpointedBlockStack(BlockStack):
    """A BlockStack whose forward, in training with gradients enabled, runs each segment of `ckpt_every`
    blocks under checkpointing with `ckpt_policy`; otherwise (eval, no_grad: the monitor's probe,
    validation) the plain loop."""

    ckpt_every: int = 1
    ckpt_policy: str = "full"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        members, k = list(self), self.ckpt_every
        for start in range(0, len(members), k):
            x = checkpoint_segment(_run(members[start:start + k]), x, policy=self.ckpt_policy)
        return x


def checkpoint_blocks(blocks: BlockStack, every: int, policy: str = "full") -> None:
    """Make `blocks` a CheckpointedBlockStack in place (segments of `every` blocks, `policy`); applying
    it again replaces the previous segmentation."""
    blocks.__class__ = CheckpointedBlockStack
    blocks.ckpt_every, blocks.ckpt_policy = every, policy


def _run(segment: list[nn.Module]):
    def run(x: torch.Tensor) -> torch.Tensor:
        for block in segment:
            x = block(x)
        return x
    return run
