# Unit tests of mgt_scale.monitor.probe on a tiny real model: the captured residual states are the
# block inputs and the last block output, MGT operator statistics come back per sublayer, and the
# model is left exactly as it was (no hooks, no sinks, same training mode).
import math

import pytest
import torch

from mgt_scale.config import MGTConfig, ModelConfig
from mgt_scale.model import build_model
from mgt_scale.monitor.probe import capture_hidden_states, capture_probe, probe_geometry


def tiny(residual="mgt", **mgt):
    cfg = ModelConfig(num_layers=3, d_model=32, num_heads=2, d_ff=64, vocab_size=50, max_seq_len=16,
                      residual=residual, mgt=MGTConfig(**mgt))
    return build_model(cfg, seed=1)


def tokens():
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))


def test_hidden_states_are_block_inputs_and_final_output():
    model = tiny()
    model.train()
    toks = tokens()
    hs = capture_hidden_states(model, toks)
    assert len(hs) == 4 and all(h.shape == (2, 12, 32) for h in hs)
    with torch.no_grad():
        x = model.embed(toks)
        assert torch.equal(hs[0], x)
        for i, block in enumerate(model.blocks):
            x = block(x)
            assert torch.allclose(hs[i + 1], x)
        assert torch.allclose(model.head(hs[-1]), model(toks))
    assert model.training  # mode restored
    for b in model.blocks:
        assert not b._forward_pre_hooks and not b._forward_hooks
        assert b.attn_res.stats_sink is None and b.ffn_res.stats_sink is None


def test_mgt_ops_statistics_at_init():
    model = tiny(alpha_init=0.25)
    _, ops = capture_probe(model, tokens())
    assert [(o["block"], o["kind"]) for o in ops] == [(b, k) for b in range(3) for k in ("attn", "ffn")]
    assert [o["sublayer"] for o in ops] == list(range(6))
    for o in ops:
        assert o["beta_mean"] == pytest.approx(math.tanh(0.5), abs=0.02)  # beta_bias_init=0.5, tiny W_beta
        assert o["beta_frac_negative"] == 0.0 and sum(o["beta_hist"]) == 2 * 12 * 32
        assert 0.0 < o["gate_mean"] < 1.0 and o["alpha_mean"] == pytest.approx(0.25)
        assert o["update_ratio"] > 0


def test_baseline_residual_has_no_ops_and_record_is_complete():
    rec = probe_geometry(tiny("preln"), tokens(), step=7)
    assert rec["step"] == 7 and rec["ops"] == [] and len(rec["layers"]) == 4
    assert all(0 < l["eff_rank_norm"] <= 1 for l in rec["layers"])
    rec = probe_geometry(tiny("ddl"), tokens(), step=8)
    assert len(rec["ops"]) == 6 and rec["ops"][0]["gate_mean"] is None and rec["ops"][0]["beta_mean"] is not None


def test_hooks_removed_when_forward_raises():
    model = tiny()

    def boom(*a):
        raise RuntimeError("boom")

    h = model.blocks[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        capture_probe(model, tokens())
    h.remove()
    for b in model.blocks:
        assert not b._forward_pre_hooks and not b._forward_hooks and b.attn_res.stats_sink is None
