# MGT's gate and beta projections at init (issue #33, finding 4): with the old N(0, 1e-3) init the gate's
# pre-activation X @ W_gate has a variance far below LayerNorm's eps, so the gate is a constant 0.5 and
# beta a constant tanh(0.5); the default `proj_init: fan_in` makes both vary. The old init stays
# reachable with `model.mgt.proj_init: std`; a std set without it is a config error.
import pytest
import torch

from mgt_scale.config import ConfigError, MGTConfig, ModelConfig, load_config
from mgt_scale.model import build_model


def gate_beta_spread(**mgt):
    cfg = ModelConfig(num_layers=4, d_model=64, num_heads=4, d_ff=128, vocab_size=100, max_seq_len=32,
                      residual="mgt", mgt=MGTConfig(**mgt))
    model = build_model(cfg, seed=0)
    gates, betas = [], []

    def sink(_op, cap):
        gates.append(cap["gate"].reshape(-1))
        betas.append(cap["beta"].reshape(-1))

    for b in model.blocks:
        b.attn_res.stats_sink = sink
        b.ffn_res.stats_sink = sink
    with torch.no_grad():
        model(torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0)))
    g, b = torch.cat(gates).double(), torch.cat(betas).double()
    return g.mean().item(), g.std().item(), b.mean().item(), b.std().item()


def test_default_init_makes_gate_and_beta_vary():
    g_mean, g_std, b_mean, b_std = gate_beta_spread()
    assert g_mean == pytest.approx(0.5, abs=0.02) and g_std > 0.15  # sigmoid(N(0, 1)): 0.50 +- 0.21
    assert b_mean == pytest.approx(0.462, abs=0.01) and b_std > 0.005  # 0.462 +- 0.016 at init_std 0.02


def test_old_init_is_reachable_and_dead():
    g_mean, g_std, b_mean, b_std = gate_beta_spread(proj_init="std")
    assert g_std < 0.02 and b_std < 1e-3  # gate 0.500 +- 0.013, beta 0.4621 +- 1.3e-4


def test_std_without_proj_init_std_is_a_config_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {synthetic: random}\nmodel: {mgt: {gate_init_std: 0.01}}\n")
    with pytest.raises(ConfigError, match="model.mgt.gate_init_std.*proj_init"):
        load_config(str(p))
    cfg = load_config(str(p), ["model.mgt.proj_init=std"])
    assert cfg.model.mgt.gate_init_std == 0.01
