# Activation checkpointing for a segment of blocks: torch non-reentrant checkpointing, either full
# recomputation ("full") or selective ("selective": the outputs of matmuls that narrow their input are kept,
# everything else is recomputed in the backward). Pure torch; applied from outside the model by
# mgt_scale.parallel.checkpointing (to MGTModel's blocks in zero mode, to the pipeline stages' layers).
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("full", "selective")
_MATMULS = {torch.ops.aten.mm.default: 0, torch.ops.aten.addmm.default: 1}  # op -> index of its left operand


def narrowing_matmul(op, args) -> bool:
    """True for a matmul whose output row is narrower than its input row (K > N in [M, K] @ [K, N]): the
    FFN down-projection (d_ff -> d) and low-rank down-projections (d -> r). Their outputs cost the least
    memory per FLOP to keep: the FFN down-projection is a quarter of a full-form MGT block's matmul FLOPs
    (a third of a pre-LN block's) and keeps d values per token."""
    i = _MATMULS.get(op)
    if i is None:
        return False
    a, b = args[i], args[i + 1]
    return b.shape[-1] < a.shape[-1]


def _keep_narrowing_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if narrowing_matmul(op, args) else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_segment(fn: Callable, *args: torch.Tensor, policy: str = "full"):
    """fn(*args) under non-reentrant checkpointing with the given recomputation policy."""
    if policy == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if policy == "selective":
        ctx = functools.partial(create_selective_checkpoint_contexts, _keep_narrowing_matmuls)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=ctx)
    raise ValueError(f"checkpoint policy {policy!r}: expected one of {POLICIES}")
