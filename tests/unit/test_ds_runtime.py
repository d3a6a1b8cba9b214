# How the process group is started (parallel/ds_runtime.py): on CUDA with NCCL, gloo is added for CPU
# tensors, because the trainer's own small collectives (flags, the loss mean, object collectives) run
# on CPU tensors and an NCCL-only group refuses them; elsewhere DeepSpeed's default stands, and
# MGT_DIST_BACKEND overrides either.
import pytest

from mgt_scale.parallel import ds_runtime
from mgt_scale.parallel.ds_runtime import process_group_backend


def test_cuda_nccl_gets_gloo_for_cpu_tensors():
    assert process_group_backend("cuda", "nccl") == "cpu:gloo,cuda:nccl"


@pytest.mark.parametrize("device,comm", [("cpu", "gloo"), ("cpu", "ccl"), ("xpu", "xccl"), ("npu", "hccl")])
def test_other_accelerators_keep_deepspeeds_default(device, comm):
    assert process_group_backend(device, comm) is None


class FakeDeepSpeed:
    def __init__(self):
        self.calls = []

    def init_distributed(self, **kwargs):
        self.calls.append(kwargs)


@pytest.mark.parametrize("override,expected", [("", None), ("  ", None), ("nccl", "nccl"),
                                               (" cpu:gloo ", "cpu:gloo")])
def test_init_distributed_passes_the_backend_and_honours_the_override(monkeypatch, override, expected):
    monkeypatch.setenv("MGT_DIST_BACKEND", override)
    ds = FakeDeepSpeed()
    ds_runtime.init_distributed(ds)  # this machine's accelerator is the CPU: DeepSpeed's default unless overridden
    assert ds.calls == [{"dist_backend": expected, "verbose": False}]


class FakeCudaAccelerator:
    def __init__(self):
        self.devices = []

    def device_name(self):
        return "cuda"

    def communication_backend_name(self):
        return "nccl"

    def set_device(self, index):
        self.devices.append(index)


def test_on_cuda_the_local_rank_device_is_current_before_the_group_starts(monkeypatch):
    import deepspeed.accelerator
    acc = FakeCudaAccelerator()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: acc)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("MGT_DIST_BACKEND", raising=False)
    ds = FakeDeepSpeed()
    ds.init_distributed = lambda **kw: ds.calls.append((list(acc.devices), kw))
    ds_runtime.init_distributed(ds)
    assert ds.calls == [([3], {"dist_backend": "cpu:gloo,cuda:nccl", "verbose": False})]
