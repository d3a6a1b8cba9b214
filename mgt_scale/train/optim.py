# Optimizer construction: torch AdamW with weight decay on weight matrices only (not on norms, biases,
# the MGT beta bias or alpha), handed to DeepSpeed as a client optimizer.
from __future__ import annotations

import torch
import torch.nn as nn

from mgt_scale.config import TrainConfig


def _named_groups(model: nn.Module) -> tuple[list, list]:
    """(decay, no_decay): (name, parameter) pairs in named_parameters order, each parameter once."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # ZeRO-3 partitions parameters (p.dim() becomes 1); ds_shape keeps the real shape
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append((name, p))
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = _named_groups(model)
    return [{"params": [p for _, p in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0}]


def param_layout(model: nn.Module) -> list[list]:
    """[group, name, shape] of each parameter in the order the optimizer (and ZeRO's flat buffers) hold
    them. Checkpoints record it: optimizer state and ZeRO partitions are flat and nameless, so a model
    whose parameters were renamed, reshaped or reordered would load another's values without an error."""
    return [[g, name, [int(n) for n in getattr(p, "ds_shape", p.shape)]]
            for g, group in enumerate(_named_groups(model)) for name, p in group]


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. `train.fused_adamw` (default) picks torch's fused kernel, one pass over
    each tensor: under ZeRO the tensors are flat partitions, in the plain loop and pipeline ZeRO-0 they
    are the parameters themselves, where the per-tensor loop also pays Python dispatch per tensor."""
    impl = {"fused": True} if t.fused_adamw else {"foreach": False}
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                             eps=1e-8, **impl)
