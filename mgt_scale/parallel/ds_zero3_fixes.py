# Three narrow fixes to DeepSpeed's ZeRO-3 optimizer (DeepSpeedZeroOptimizer_Stage3), applied at import by
# mgt_scale.parallel.ds_runtime. None changes a number: each removes a copy of data that DeepSpeed
# already holds (tests/unit/test_ds_zero3_fixes.py compares losses, norms, weights and checkpoints).
#
# 1. The fp32 master copy. Since DeepSpeed PR #7651, `_create_fp32_partitions` reuses the model's own
#    partition as the fp32 master when it is already fp32 on the optimizer's device, instead of keeping a
#    second copy of every weight and copying one into the other after each step. The test it uses,
#    `partition.device == self.device`, compares a torch.device with the string from
#    `get_accelerator().current_device_name()`; torch calls those unequal (`torch.device('cpu') == 'cpu'`
#    and `torch.device('cuda:0') == 'cuda:0'` are False), so the reuse never happens. The fix gives that
#    method a torch.device for the comparison and puts the string back after.
# 2. The gradient flatten. `_prepare_fp32_grad_for_sub_group` concatenates the sub-group's gradient
#    partitions into a new tensor every step. Those partitions are consecutive slices of one buffer
#    (`grad_partitions_flat_buffer`), so when they are (checked each call) and the dtype already matches,
#    the slice of the buffer that covers them is the same tensor without the copy.
# 3. Single-rank gradients. Each gradient is copied into a reduce bucket; when the bucket is full it is
#    divided by the world size, all-reduced, and copied into the gradient's partition buffer. In a job of
#    one process the division is by 1.0 and the all-reduce moves nothing, so the result is the gradient
#    itself: the fix copies (or, when accumulating micro-batches, adds) it straight into its partition,
#    one pass over the gradients instead of three. Only where every step of the skipped path is an
#    identity: world size 1, no optimizer offload, no predivide factor, no sequence parallelism, the
#    gradient already in the communication dtype (otherwise the bucket would round it).
#
# Each fix is installed only while it fits the installed DeepSpeed: fix 1 while the method still holds
# the defective comparison, fixes 2 and 3 when the sources of the methods they replace or skip are
# exactly ones this file was checked against.
# A later DeepSpeed that rewrites them gets no fix rather than a wrong one; `applied_fixes()` says which
# are in place. MGT_DS_ZERO3_FIXES=0 keeps DeepSpeed's own behaviour (to rule the fixes out when debugging).
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import textwrap
from typing import Optional

# sha256 of textwrap.dedent(inspect.getsource(method)) for the DeepSpeed versions checked (0.19.8).
_KNOWN_PREPARE_SOURCES = {"44d0f71378ee31203be8a31ee00394efae995307a4abc8d512755c2aa6bfe1bd"}
# Fix 3: the sha256 of the five methods' sources joined in _GRADIENT_PATH order (the hook it replaces and
# the bucket path it skips, whose every step it reproduces).
_GRADIENT_PATH = ("reduce_independent_p_g_buckets_and_remove_grads",
                  "_DeepSpeedZeroOptimizer_Stage3__add_grad_to_ipg_bucket",
                  "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
                  "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads", "partition_grads")
_KNOWN_GRADIENT_PATH_SOURCES = {"c8ca44c690434761fc8ad914d8b4e6f04f36e993fc1a0273861878a389d2fb7b"}
_DEVICE_TEST = "self.fp16_partitioned_groups_flat[i].device == self.device"

_enabled = os.environ.get("MGT_DS_ZERO3_FIXES", "1") != "0"
_installed = False
_applied: list[str] = []


def set_enabled(enabled: bool) -> None:
    """Switch the installed fixes on or off for optimizers built (fix 1) or stepped (fix 2) from now on."""
    global _enabled
    _enabled = enabled


def applied_fixes() -> list[str]:
    return list(_applied)


def _source(fn) -> str:
    """The method's source, or "" where it cannot be read (an install without .py files): no fix then."""
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return ""


def _source_sha256(fn) -> str:
    return hashlib.sha256(_source(fn).encode()).hexdigest()


def contiguous_run(tensors: list) -> Optional[object]:
    """The 1-D tensor covering `tensors` end to end when they are consecutive 1-D contiguous slices of one
    storage, in order (then it holds exactly what `torch.cat(tensors)` would); None otherwise."""
    if not tensors:
        return None
    first = tensors[0]
    storage_ptr = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        if (t.dim() != 1 or not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.untyped_storage().data_ptr() != storage_ptr or t.storage_offset() != offset):
            return None
        offset += t.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())


def _install_master_reuse(cls) -> bool:
    original = cls._create_fp32_partitions
    if _DEVICE_TEST not in _source(original):
        return False

    @functools.wraps(original)
    def create_fp32_partitions(self, *args, **kwargs):
        import torch
        device = self.device
        if not (_enabled and isinstance(device, str)):
            return original(self, *args, **kwargs)
        self.device = torch.device(device)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.device = device

    cls._create_fp32_partitions = create_fp32_partitions
    return True


def _install_gradient_view(cls) -> bool:
    original = cls._prepare_fp32_grad_for_sub_group
    if _source_sha256(original) not in _KNOWN_PREPARE_SOURCES:
        return False

    @functools.wraps(original)
    def prepare_fp32_grad_for_sub_group(self, sub_group_id):
        fp32 = self.fp32_partitioned_groups_flat[sub_group_id]
        grads = self.averaged_gradients[sub_group_id]
        view = contiguous_run(grads) if _enabled else None
        if view is None or view.dtype != fp32.dtype or view.device != fp32.device or view.numel() != fp32.numel():
            return original(self, sub_group_id)
        # The rest is the original's, minus the copy.
        fp32.grad = view
        from deepspeed.accelerator import get_accelerator
        if not get_accelerator().is_synchronized_device():
            for grad in filter(lambda g: get_accelerator().on_accelerator(g), grads):
                grad.record_stream(get_accelerator().current_stream())
        self.averaged_gradients[sub_group_id] = None

    cls._prepare_fp32_grad_for_sub_group = prepare_fp32_grad_for_sub_group
    return True


def _gradient_path_sha256(cls) -> str:
    sources = [_source(getattr(cls, name, None)) for name in _GRADIENT_PATH]
    return "" if not all(sources) else hashlib.sha256("\n".join(sources).encode()).hexdigest()


def _single_rank_job(opt) -> bool:
    """Whether `opt` runs where the bucket path is an identity (see fix 3); decided once per optimizer."""
    ok = getattr(opt, "_mgt_single_rank_gradients", None)
    if ok is None:
        from deepspeed import comm as dist
        ok = (dist.get_world_size() == 1 and not opt.offload_optimizer and not getattr(opt, "zenflow", False)
              and not getattr(opt, "use_muon", False) and opt.autoep_folding_tp_group is None
              and opt.contiguous_gradients and not opt.reduce_scatter and opt.gradient_predivide_factor == 1.0
              and opt.sequence_parallel_size == 1 and not opt.enable_sanity_checks)
        opt._mgt_single_rank_gradients = ok
    return ok


def _install_single_rank_gradients(cls) -> bool:
    original = cls.reduce_independent_p_g_buckets_and_remove_grads
    if _gradient_path_sha256(cls) not in _KNOWN_GRADIENT_PATH_SOURCES:
        return False

    @functools.wraps(original)
    def reduce_independent_p_g_buckets_and_remove_grads(self, param):
        grad = param.grad
        if not (_enabled and _single_rank_job(self) and grad is not None and getattr(param, "ds_grad_is_ready", True)
                and grad.numel() == param.ds_numel == param.partition_numel() <= self.reduce_bucket_size
                and grad.dtype == self.get_param_comm_dtype(param)):
            return original(self, param)
        # What the bucket path leaves in the partition (partition_grads), without the bucket.
        import torch
        with torch.no_grad():
            grad_buffer = self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition[param.ds_id]
            grad_buffer = grad_buffer.narrow(0, 0, grad.numel())
            if self.micro_step_id == 0:
                grad_buffer.copy_(grad.view(-1))
            else:
                grad_buffer.add_(grad.view(-1).to(self.gradient_accumulation_dtype))
        self._offload_boundary_param_ids.add(param.ds_id)
        param.grad = None

    cls.reduce_independent_p_g_buckets_and_remove_grads = reduce_independent_p_g_buckets_and_remove_grads
    return True


def install() -> list[str]:
    """Install the fixes that fit the imported DeepSpeed (once per process); the names of those in place."""
    global _installed
    if _installed:
        return applied_fixes()
    _installed = True
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    if _install_master_reuse(Stage3):
        _applied.append("fp32-master-reuse")
    if _install_gradient_view(Stage3):
        _applied.append("gradient-view")
    if _install_single_rank_gradients(Stage3):
        _applied.append("single-rank-gradients")
    return applied_fixes()


def describe() -> str:
    """One start-up log line: which fixes are in place, for a run's log."""
    if not _enabled:
        return "ZeRO-3 optimizer fixes: off (MGT_DS_ZERO3_FIXES=0)"
    if not _applied:
        return "ZeRO-3 optimizer fixes: none fit this DeepSpeed version"
    return f"ZeRO-3 optimizer fixes: {', '.join(_applied)}"
