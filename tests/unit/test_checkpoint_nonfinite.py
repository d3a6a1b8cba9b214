# The non-finite guard of ZeroEngine.train_step (one in-process rank, ZeRO-3, fp32 CPU): a step with
# a NaN loss is skipped without touching parameters or optimizer state (Adam moments and step count),
# and the run that took it continues exactly like a run in which that batch never happened.

import pytest
import torch

from mgt_scale.config import load_config



def engine(cfg):
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.engine.zero import ZeroEngine
    return ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")


def params(e):
    from mgt_scale.parallel.convert import consolidated_state_dict
    return consolidated_state_dict(e)


def opt_state(e):
    inner = e.engine.optimizer.optimizer
    out = []
    for p, st in inner.state.items():
        out.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    return out


def batches(seed, n=2, b=2, t=16, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g))
            for _ in range(n)]


def same(a, b):
    assert a.keys() == b.keys() if isinstance(a, dict) else len(a) == len(b)
    items = a.items() if isinstance(a, dict) else enumerate(a)
    for k, v in items:
        w = b[k]
        if isinstance(v, dict):
            same(v, w)
        elif torch.is_tensor(v):
            assert torch.equal(v, w), k
        else:
            assert v == w, k


@pytest.mark.slow
def test_nan_step_is_skipped_exactly(inprocess_dist, tmp_path, fault_hooks):
    cfg = load_config(None, ["data.synthetic=copy", "model.num_layers=2", "model.d_model=32", "model.num_heads=4",
                             "model.d_ff=64", "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16", "monitor.interval=0",
                             "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.precision=fp32"])
    a, b, c = batches(1), batches(2), batches(3)
    e1 = engine(cfg)
    e1.set_lr(1e-2)
    r = e1.train_step(a)
    assert not r.skipped
    p_before, o_before = params(e1), opt_state(e1)
    with fault_hooks.nan_loss():  # the engine's lm_loss NaN (tests/fault_hooks)
        r = e1.train_step(b)
    assert r.skipped and r.loss != r.loss  # NaN loss reported, update skipped
    same(params(e1), p_before)
    same(opt_state(e1), o_before)  # Adam moments and step count untouched
    r1 = e1.train_step(c)

    e2 = engine(cfg)  # the reference: batch b never happened
    e2.set_lr(1e-2)
    e2.train_step(a)
    r2 = e2.train_step(c)
    assert r1.loss == r2.loss and r1.grad_norm == r2.grad_norm
    same(params(e1), params(e2))
    same(opt_state(e1), opt_state(e2))
