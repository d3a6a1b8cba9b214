# The rotary-table cache (mgt_scale/model/layers.py, cached_rotary_tables): one table per (head_dim, base,
# device, dtype) for every layer and step, the rows of `rotary_tables` bit for bit (offsets for the KV cache
# included); tables made in inference mode never reach a training step; nothing is stored under a dispatch
# mode (fake or counting tensors).
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mgt_scale.config import ModelConfig
from mgt_scale.model import build_model, layers, lm_loss
from mgt_scale.model.layers import cached_rotary_tables, rotary_tables


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(layers, "_ROTARY_CACHE", {})


def test_tables_are_built_once_for_every_layer_and_step(monkeypatch):
    calls = []
    real = layers.rotary_tables

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "rotary_tables", counting)
    cfg = ModelConfig(num_layers=3, d_model=32, num_heads=2, d_ff=64, vocab_size=50, max_seq_len=16)
    model = build_model(cfg, seed=1)
    tokens = torch.randint(0, 50, (2, 12))
    for _ in range(2):
        lm_loss(model(tokens), tokens).backward()
    model(tokens[:, :5])  # a shorter sequence: rows of the same table
    assert calls == [12]  # was one table per layer and forward (9 here)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_rows_equal_fresh_tables_bit_for_bit(dtype):
    for length, start in [(7, 0), (3, 4), (20, 0), (1, 19), (5, 30)]:  # grows twice
        want = rotary_tables(length, 16, 10000.0, "cpu", dtype, start=start)
        got = cached_rotary_tables(length, 16, 10000.0, "cpu", dtype, start=start)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), (length, start)
    assert len(layers._ROTARY_CACHE) == 1


def test_inference_mode_tables_are_not_used_for_training():
    cfg = ModelConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, vocab_size=50, max_seq_len=16)
    model = build_model(cfg, seed=1)
    tokens = torch.randint(0, 50, (2, 8))
    with torch.inference_mode():
        model(tokens)
    lm_loss(model(tokens), tokens).backward()  # autograd refuses to save inference tensors: would raise


def test_nothing_is_cached_under_a_dispatch_mode():
    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        cached_rotary_tables(4, 8, 10000.0, "cpu", torch.float32)
    assert not layers._ROTARY_CACHE
