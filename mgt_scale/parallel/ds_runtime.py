# How mgt-scale imports DeepSpeed at run time and starts the process group: one place for the
# process-wide adjustments that must happen before DeepSpeed's communication backend or its ZeRO-3
# optimizer is first created.
from __future__ import annotations

_PATCHED = False


def import_deepspeed():
    """Import DeepSpeed, and on the CPU accelerator turn off its shared-memory all-reduce op.

    DeepSpeed's torch backend JIT-builds `deepspeed_shm_comm` on CPU the first time a process group
    is created. Training never uses it (it serves only `inference_all_reduce`; our collectives go
    through gloo), and it costs: a ~2-minute compile on a fresh machine; a build lock file in
    ~/.cache/torch_extensions that a launch killed mid-build leaves behind, after which every later
    launch on that machine waits on it forever; and two 66 MB /dev/shm buffers per launch that are
    never unlinked. GPU accelerators do not build it, so this changes nothing there.
    Set MGT_DS_SHM_COMM=1 to keep DeepSpeed's default.

    It also installs the two copy-saving fixes of mgt_scale.parallel.ds_zero3_fixes in ZeRO-3's
    optimizer, where mgt_scale.parallel.ds_patches' guard allows (MGT_DS_ZERO3_FIXES=0 keeps DeepSpeed's
    own code paths).
    """
    global _PATCHED
    import importlib
    import os

    import deepspeed
    if _PATCHED:
        return deepspeed
    from mgt_scale.parallel import ds_zero3_fixes
    ds_zero3_fixes.install()
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu" and os.environ.get("MGT_DS_SHM_COMM", "") != "1":
        # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the real torch
        # package under the name `torch`, which that statement would return instead.
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        ds_torch_comm.build_shm_op = lambda: None
    _PATCHED = True
    return deepspeed


def init_distributed(deepspeed, timeout_minutes: float | None = None) -> None:
    """`deepspeed.init_distributed` (a no-op if the process group exists already); every entry point that
    starts a process group calls this, not DeepSpeed. On GPUs the rank's device (LOCAL_RANK) is made
    current first, so that nothing before DeepSpeed's engine (which sets it too) works on GPU 0 from
    every rank, and the NCCL collectives of mgt_scale.parallel.collectives find their device.
    `MGT_DIST_BACKEND` replaces DeepSpeed's backend (NCCL on GPUs, gloo on CPUs) with any backend
    string torch accepts, such as `cpu:gloo,cuda:nccl` or, on CPUs, `cpu:gloo` (the tests run that).
    `timeout_minutes` (parallel.dist_timeout_minutes) bounds every collective of the group, instead of
    torch's default (10 minutes under NCCL), which a long rank-0 step at scale would exceed."""
    import os
    from datetime import timedelta

    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = os.environ.get("MGT_DIST_BACKEND", "").strip() or None
    kwargs = {} if timeout_minutes is None else {"timeout": timedelta(minutes=float(timeout_minutes))}
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
