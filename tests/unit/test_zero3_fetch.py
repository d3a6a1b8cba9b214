# ZeRO-3 engine settings that must not change the numbers.
# - Fetch granularity (`parallel.zero3_fetch`): with "block", each transformer block is a DeepSpeed leaf
#   module (its parameters gathered in one fetch, no hooks on its submodules); training must give the
#   same losses, gradient norms and weights as DeepSpeed's per-module default, with and without
#   activation checkpointing (full or selective recomputation).
# - Gradient reduction on one rank: the all-reduce path over the contiguous buffer instead of ZeRO's
#   reduce-scatter (mgt_scale/parallel/ds_config.py), with the same results, also with CPU offload.
# - torch's own linear on one rank instead of DeepSpeed's `zero3_linear_wrap`: equal to float rounding.
# One in-process rank, fp32 CPU; the 2-rank tests in tests/distributed run the defaults on 2 ranks
# against 1 rank.

import pytest
import torch

from mgt_scale.config import load_config

BASE = ["data.synthetic=copy", "model.num_layers=3", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
        "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16", "monitor.interval=0",
        "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.precision=fp32"]


def run(fetch: str, extra=(), steps=3):
    from mgt_scale.parallel.convert import consolidated_state_dict
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.engine.zero import ZeroEngine
    cfg = load_config(None, BASE + [f"parallel.zero3_fetch={fetch}", *extra])
    e = ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")
    e.set_lr(1e-2)
    g = torch.Generator().manual_seed(0)
    results = []
    for _ in range(steps):
        mb = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
              for _ in range(2)]
        r = e.train_step(mb)
        results.append((r.loss, r.grad_norm))
    return e, results, consolidated_state_dict(e)


def deepspeed_defaults_for(monkeypatch, **zero_keys) -> None:
    """Make the engine's DeepSpeed config use these `zero_optimization` values (DeepSpeed's defaults for
    what ds_config.py changes on one rank), so a test can compare the two paths."""
    import mgt_scale.engine.zero as engines
    from mgt_scale.parallel.ds_config import deepspeed_config

    def config(*args, **kwargs):
        ds = deepspeed_config(*args, **kwargs)
        ds["zero_optimization"].update(zero_keys)
        return ds
    monkeypatch.setattr(engines, "deepspeed_config", config)


def ds_hooked(module) -> bool:
    """Whether DeepSpeed's ZeRO-3 fetch hooks sit on this module (it registers forward pre-hooks)."""
    return len(module._forward_pre_hooks) > 0


@pytest.mark.parametrize("extra", [(), ("parallel.activation_checkpointing=true",),
                                   ("parallel.activation_checkpointing=true", "parallel.checkpoint_policy=selective")],
                         ids=["plain", "ckpt", "ckpt-selective"])
@pytest.mark.slow
def test_block_fetch_trains_exactly_like_module_fetch(inprocess_dist, extra):
    e_block, r_block, w_block = run("block", extra)
    e_mod, r_mod, w_mod = run("module", extra)
    assert r_block == r_mod  # bit-identical losses and gradient norms
    assert w_block.keys() == w_mod.keys()
    for k in w_block:
        assert torch.equal(w_block[k], w_mod[k]), k
    # the mechanism: blocks are leaves and their submodules carry no fetch hooks in "block" mode
    for blk in e_block.module.blocks:
        assert getattr(blk, "_z3_leaf", False) and ds_hooked(blk)
        assert not any(ds_hooked(m) for m in blk.modules() if m is not blk)
    for blk in e_mod.module.blocks:
        assert not getattr(blk, "_z3_leaf", False)
        assert ds_hooked(blk.ffn.up)


@pytest.mark.slow
def test_selective_checkpointing_under_zero3_trains_exactly_like_no_checkpointing(inprocess_dist):
    _, r_plain, w_plain = run("block")
    _, r_sel, w_sel = run("block", ("parallel.activation_checkpointing=true", "parallel.checkpoint_policy=selective"))
    assert r_sel == r_plain
    for k in w_plain:
        assert torch.equal(w_sel[k], w_plain[k]), k


def test_unknown_fetch_mode_is_an_error_naming_the_key():
    with pytest.raises(Exception, match="parallel.zero3_fetch"):
        load_config(None, ["parallel.zero3_fetch=layer"])


@pytest.mark.parametrize("extra", [(), ("parallel.offload_optimizer=cpu",),
                                   ("parallel.offload_optimizer=cpu", "parallel.offload_params=cpu")],
                         ids=["no-offload", "offload-optimizer", "offload-both"])
@pytest.mark.slow
def test_one_rank_reduces_gradients_in_place_with_the_same_numbers(inprocess_dist, monkeypatch, extra):
    from mgt_scale.parallel.ds_config import deepspeed_config
    from mgt_scale.parallel.topology import plan_batch
    e_ours, r_ours, w_ours = run("block", extra)
    assert e_ours.ds_config["zero_optimization"]["reduce_scatter"] is False
    assert e_ours.engine.optimizer.reduce_scatter is False  # DeepSpeed took the all-reduce path

    deepspeed_defaults_for(monkeypatch, reduce_scatter=True)
    e_rs, r_rs, w_rs = run("block", extra)
    assert e_rs.engine.optimizer.reduce_scatter is True
    assert r_ours == r_rs  # bit-identical losses and gradient norms
    for k in w_ours:
        assert torch.equal(w_ours[k], w_rs[k]), k
    # more than one rank keeps the reduce-scatter (half the bytes of an all-reduce)
    cfg = load_config(None, BASE)
    assert deepspeed_config(cfg, plan_batch(cfg, 2), "fp32")["zero_optimization"]["reduce_scatter"] is True


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("parallel.offload_optimizer=cpu",)], ids=["no-offload", "offload-optimizer"])
def test_one_rank_uses_torchs_linear_with_the_same_numbers(inprocess_dist, monkeypatch, extra):
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    linear_before = F.linear  # DeepSpeed swaps F.linear process-wide and never swaps it back
    try:
        F.linear = torch._C._nn.linear
        e_ours, r_ours, w_ours = run("block", extra)
        assert e_ours.ds_config["zero_optimization"]["memory_efficient_linear"] is False
        assert F.linear is torch._C._nn.linear  # DeepSpeed left torch's linear in place
        deepspeed_defaults_for(monkeypatch, memory_efficient_linear=True)
        e_wrap, r_wrap, w_wrap = run("block", extra)
        assert F.linear is zero3_linear_wrap
    finally:
        F.linear = linear_before
    # DeepSpeed's Function adds the bias after the matmul, torch's addmm before it: equal to rounding
    for (loss, norm), (loss_w, norm_w) in zip(r_ours, r_wrap):
        assert loss == pytest.approx(loss_w, rel=1e-6) and norm == pytest.approx(norm_w, rel=1e-5)
    for k in w_ours:
        torch.testing.assert_close(w_ours[k], w_wrap[k], rtol=1e-5, atol=1e-6, msg=k)


def test_more_ranks_or_parameter_offload_keep_deepspeeds_memory_efficient_linear():
    from mgt_scale.parallel.ds_config import deepspeed_config
    from mgt_scale.parallel.topology import plan_batch
    cfg = load_config(None, BASE)
    offload = load_config(None, BASE + ["parallel.offload_params=cpu"])
    for c, ranks in ((cfg, 2), (offload, 1)):
        zero = deepspeed_config(c, plan_batch(c, ranks), "fp32")["zero_optimization"]
        assert zero["memory_efficient_linear"] is True, ranks
