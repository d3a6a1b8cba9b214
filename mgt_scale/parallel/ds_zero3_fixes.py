# Two narrow fixes to DeepSpeed's ZeRO-3 optimizer (DeepSpeedZeroOptimizer_Stage3), applied at import by
# mgt_scale.parallel.ds_runtime. Neither changes a number: each removes a copy of data that DeepSpeed
# already holds (tests/unit/test_ds_zero3_fixes.py compares losses, norms, weights and checkpoints), on
# any number of ranks and on GPUs as on CPUs.
#
# 1. The fp32 master copy (a DeepSpeed bug; docs/OPERATORS.md section 6). Since DeepSpeed PR #7651,
#    `_create_fp32_partitions` reuses the model's own partition as the fp32 master when it is already
#    fp32 on the optimizer's device, instead of keeping a second copy of every weight and copying one
#    into the other after each step. The test it uses, `partition.device == self.device`, compares a
#    torch.device with the string from `get_accelerator().current_device_name()`; torch calls those
#    unequal (`torch.device('cpu') == 'cpu'` and `torch.device('cuda:0') == 'cuda:0'` are False), so the
#    reuse never happens. The fix gives that method a torch.device for the comparison and puts the
#    string back after.
# 2. The gradient flatten. `_prepare_fp32_grad_for_sub_group` concatenates the sub-group's gradient
#    partitions into a new tensor every step. Those partitions are consecutive slices of one buffer
#    (`grad_partitions_flat_buffer`), so when they are (checked each call) and the dtype already matches,
#    the slice of the buffer that covers them is the same tensor without the copy.
#
# Each is installed only through mgt_scale.parallel.ds_patches' guard: the source of the method it wraps
# or replaces must be the one checked (DeepSpeed 0.19.8, the version pyproject.toml pins), and
# MGT_DS_ZERO3_FIXES=0 keeps DeepSpeed's own behaviour (to rule the fixes out when debugging).
# `applied_fixes()` and the start-up line say which are in place.
from __future__ import annotations

import functools
from typing import Optional

from mgt_scale.parallel import ds_patches

_enabled = True  # installed fixes act; set_enabled(False) makes them pass through (tests, benchmarks)
_installed = False
_applied: list[str] = []


def set_enabled(enabled: bool) -> None:
    """Switch the installed fixes on or off for optimizers built (fix 1) or stepped (fix 2) from now on."""
    global _enabled
    _enabled = enabled


def applied_fixes() -> list[str]:
    return list(_applied)


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
    if not ds_patches.guard("fp32-master-reuse"):
        return False
    original = cls._create_fp32_partitions

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
    if not ds_patches.guard("gradient-view"):
        return False
    original = cls._prepare_fp32_grad_for_sub_group

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
    return applied_fixes()


def describe() -> str:
    """One start-up log line: which fixes are in place, for a run's log."""
    return ds_patches.describe("zero3")
