# How the process group is started (parallel/ds_runtime.py) and where the trainer's own collectives put
# their tensors (parallel/collectives.py): under NCCL, DeepSpeed's group on GPUs, on this rank's CUDA
# device, since NCCL refuses CPU tensors; under gloo or a group with a CPU backend mapped in, on the
# CPU. No GPU here: the backend and the CUDA device are faked where a GPU would be needed, and a real
# 2-process gloo group checks the collectives' values.
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mgt_scale.parallel import collectives, ds_runtime


class FakeDeepSpeed:
    def __init__(self):
        self.calls = []

    def init_distributed(self, **kwargs):
        self.calls.append(kwargs)


@pytest.mark.parametrize("override,expected", [("", None), ("  ", None), ("nccl", "nccl"),
                                               (" cpu:gloo ", "cpu:gloo")])
def test_init_distributed_keeps_deepspeeds_backend_unless_overridden(monkeypatch, override, expected):
    monkeypatch.setenv("MGT_DIST_BACKEND", override)
    ds = FakeDeepSpeed()
    ds_runtime.init_distributed(ds)
    assert ds.calls == [{"dist_backend": expected, "verbose": False}]


class FakeCudaAccelerator:
    def __init__(self):
        self.devices = []

    def device_name(self):
        return "cuda"

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
    assert ds.calls == [([3], {"dist_backend": None, "verbose": False})]


@pytest.mark.parametrize("backend,device", [("nccl", "cuda:5"), ("NCCL", "cuda:5"), ("gloo", "cpu"),
                                            ("cpu:gloo,cuda:nccl", "cpu"), ("cpu:gloo", "cpu"), ("mpi", "cpu")])
def test_collective_device_follows_the_backend(monkeypatch, backend, device):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert collectives.collective_device() == torch.device(device)


def test_one_process_needs_no_group():
    assert collectives.any_rank(True) is True and collectives.any_rank(False) is False
    assert collectives.mean_over_ranks(torch.tensor(2.5)) == 2.5
    t = torch.tensor([1.0, 2.0])
    out = collectives.all_reduce(t)
    assert torch.equal(out, t) and out is not t


def _worker(rank: int, port: int, backend: str, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=2)
    try:
        t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
        results[rank] = {
            "any_true": collectives.any_rank(rank == 1), "any_false": collectives.any_rank(False),
            "mean": collectives.mean_over_ranks(torch.tensor(float(rank + 1), dtype=torch.float32)),
            "sum": collectives.all_reduce(t).tolist(), "t_kept": t.tolist(),
            "max": collectives.all_reduce(t, dist.ReduceOp.MAX).tolist(),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo"])
def test_collectives_on_two_ranks(backend):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, backend, results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        assert r["any_true"] is True and r["any_false"] is False
        assert r["mean"] == 1.5
        assert r["sum"] == [3.0, 30.0] and r["max"] == [2.0, 20.0]
        assert r["t_kept"] == [float(rank + 1), 10.0 * (rank + 1)]  # the input is not reduced in place


@pytest.mark.parametrize("native,accelerator,expected", [(True, None, "bf16"), (False, None, "fp32"),
                                                         (True, "cpu", "fp32"), (True, "cuda", "bf16")])
def test_auto_precision_takes_bf16_only_where_the_gpu_runs_it_natively(monkeypatch, native, accelerator, expected):
    """V100s and T4s only emulate bf16: `is_bf16_supported()` says yes to them unless asked for native
    support, and it finds out by creating a tensor (a CUDA context on GPU 0 from every rank)."""
    from mgt_scale.parallel.ds_config import detect_precision
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    if accelerator is None:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    else:
        monkeypatch.setenv("DS_ACCELERATOR", accelerator)
    assert detect_precision("auto") == expected
    assert asked in ([], [False])  # never the emulating default
    assert detect_precision("fp32") == "fp32" and detect_precision("bf16") == "bf16"


def test_the_configured_timeout_is_passed_to_deepspeed(monkeypatch):
    from datetime import timedelta

    from mgt_scale.config import load_config
    monkeypatch.delenv("MGT_DIST_BACKEND", raising=False)
    cfg = load_config(None, ["data.synthetic=copy", "parallel.dist_timeout_minutes=90"])
    ds = FakeDeepSpeed()
    ds_runtime.init_distributed(ds, cfg.parallel.dist_timeout_minutes)
    assert ds.calls == [{"dist_backend": None, "verbose": False, "timeout": timedelta(minutes=90)}]
    assert load_config(None, ["data.synthetic=copy"]).parallel.dist_timeout_minutes == 60  # default
