# The trainer's own small collectives (a flag from any rank, a mean over ranks, a sum of counts), on a
# tensor the process group's backend takes: under NCCL (DeepSpeed's group on GPUs) a tensor on this
# rank's CUDA device, since NCCL refuses CPU tensors ("No backend type associated with device type
# cpu"); under gloo, or a group with a CPU backend mapped in ("cpu:gloo,cuda:nccl"), a CPU tensor.
# Everything stays on NCCL on GPU clusters, so no gloo interface has to reach across nodes.
from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group=None) -> torch.device:
    """Where a tensor for a collective on `group` (default: the world) must live."""
    backend = str(dist.get_backend(group)).lower()
    if "cpu:" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """`t` reduced over `group` (SUM by default), returned on t's device; `t` itself is left as it is."""
    if not _active(group):
        return t.clone()
    work = t.detach().to(collective_device(group), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return work.to(t.device)


def any_rank(flag: bool, group=None) -> bool:
    """True if `flag` is set on any rank of `group` (a collective: every rank must call it)."""
    if not _active(group):
        return flag
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), dist.ReduceOp.MAX, group).item() > 0)


def mean_over_ranks(value: torch.Tensor, group=None) -> float:
    """The mean of a scalar over the ranks of `group`, as a Python float."""
    if not _active(group):
        return float(value)
    return float(all_reduce(value.detach().reshape(()), group=group) / dist.get_world_size(group))  # in value's dtype
