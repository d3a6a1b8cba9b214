# The RNG state a checkpoint keeps for each rank (checkpoint/manifest.py): on GPUs only the CUDA state of
# the rank's own device, so saving touches no other GPU and a resume on a node with fewer GPUs (a
# resharded resume hands rank 0's state to ranks without a file) restores it. No GPU here: torch.cuda
# is replaced by a fake with per-device states that fails on any all-device call.
import io
import random

import numpy as np
import pytest
import torch

from mgt_scale.checkpoint import manifest as checkpoint


class FakeCuda:
    """Per-device CUDA RNG states of a node with `n` GPUs, `device` current."""

    def __init__(self, monkeypatch, n: int, device: int):
        self.states = {i: torch.full((16,), i + 1, dtype=torch.uint8) for i in range(n)}
        self.n, self.device, self.set_calls = n, device, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.device].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)
        for name in ("get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: pytest.fail(f"{name} touches every GPU"))

    def _set(self, state, device="cuda"):
        self.set_calls.append((self.device, state.clone()))
        self.states[self.device] = state.clone()


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_saves_this_devices_state_only_and_restores_it(monkeypatch):
    cuda = FakeCuda(monkeypatch, n=8, device=3)
    state = round_trip(checkpoint.rng_state())
    assert torch.equal(state["cuda"], cuda.states[3])
    cuda.states[3] = torch.zeros(16, dtype=torch.uint8)  # the run goes on and draws
    checkpoint.set_rng_state(state)
    assert [d for d, _ in cuda.set_calls] == [3]
    assert torch.equal(cuda.states[3], torch.full((16,), 4, dtype=torch.uint8))


def test_resume_on_a_node_with_fewer_gpus(monkeypatch):
    FakeCuda(monkeypatch, n=8, device=7)
    saved = round_trip(checkpoint.rng_state())  # rank 7 of an 8-GPU node
    cuda = FakeCuda(monkeypatch, n=2, device=1)  # the resharded run: 2 GPUs a node
    checkpoint.set_rng_state(saved)
    assert [(d, int(s[0])) for d, s in cuda.set_calls] == [(1, 8)]


@pytest.mark.parametrize("n_saved,device,expected", [(8, 1, [(1, 2)]), (2, 5, [])])
def test_state_lists_of_earlier_versions_still_load(monkeypatch, n_saved, device, expected):
    """Earlier versions saved one state per visible GPU: the current device's entry is restored, or
    none where the list is shorter (the CPU, python and numpy states are restored either way)."""
    cuda = FakeCuda(monkeypatch, n=max(n_saved, device + 1), device=device)
    state = checkpoint.rng_state()
    state["cuda"] = [torch.full((16,), i + 1, dtype=torch.uint8) for i in range(n_saved)]
    want_py = random.random()
    random.seed(12345)
    checkpoint.set_rng_state(round_trip(state))
    assert random.random() == want_py
    assert [(d, int(s[0])) for d, s in cuda.set_calls] == expected


def test_cpu_only_state_has_no_cuda_entry(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = checkpoint.rng_state()
    assert "cuda" not in state
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    checkpoint.set_rng_state(round_trip(state))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want
