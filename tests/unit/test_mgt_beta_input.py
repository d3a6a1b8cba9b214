# model.mgt.beta_input (issue #33's sensitivity arm): with `ln` beta reads the sublayer's normalised input,
# beta = lam tanh(LN(X) W_beta + b_beta) + eps, checked against an independent fp64 hand computation on
# tiny tensors (fused and op-by-op paths, full and low-rank projections, per-channel and per-token beta,
# mgt and ddl); `x` (the default) keeps the raw-stream formula; the config refuses other values; the
# monitor's beta statistics are those of the beta the operator used.
import math

import pytest
import torch

from mgt_scale.config import ConfigError, MGTConfig, ModelConfig, from_dict, load_config
from mgt_scale.model import ResidualOp, build_model

D = 8


def make_op(kind="mgt", **mgt):
    cfg = ModelConfig(num_layers=4, d_model=D, num_heads=2, d_ff=16, vocab_size=40, residual=kind,
                      mgt=MGTConfig(**mgt))
    op = ResidualOp(cfg).double()
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-trivial LN gains, biases, alpha, b_beta
        for p in op.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return cfg, op


def ln_ref(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def sublayer(x):
    return torch.tanh(x @ torch.linspace(-1, 1, D * D, dtype=x.dtype).reshape(D, D)) + 0.1 * x


def hand(op, cfg, x, reads_ln: bool):
    """(out, beta) of the MGT / DDL update written out from the formulas, in fp64."""
    m = cfg.mgt
    w = op.gate_beta_up @ op.gate_beta_down if op.proj_rank else op.gate_beta
    gate_rows = D if cfg.residual == "mgt" else 0
    w_gate, w_beta = w[:gate_rows], w[gate_rows:]
    xn = ln_ref(x, op.norm_weight, op.norm_bias)
    src = xn if reads_ln else x
    beta = m.lam * torch.tanh(src @ w_beta.T + op.beta_bias) + m.eps
    f = sublayer(xn)
    if gate_rows:
        f = f * torch.sigmoid(ln_ref(x @ w_gate.T, op.gate_norm_weight, op.gate_norm_bias))
    return x + beta * (f - op.alpha * x), beta


@pytest.fixture
def x():
    # a stream well away from unit scale, so that X and LN(X) give clearly different beta
    return 3.0 * torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.7


CASES = [("mgt", {}), ("mgt", {"beta_shape": "token"}), ("mgt", {"proj_rank": 3}),
         ("mgt", {"proj_rank": 3, "beta_shape": "token", "alpha_shape": "channel"}), ("ddl", {"lam": 1.3, "eps": 0.5}),
         ("ddl", {"proj_rank": 2})]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind,mgt", CASES)
@pytest.mark.parametrize("beta_input", ["x", "ln"])
def test_beta_and_update_equal_hand_computation(x, kind, mgt, fused, beta_input):
    cfg, op = make_op(kind, fused=fused, beta_input=beta_input, **mgt)
    got = {}
    op.stats_sink = lambda _op, cap: got.update(cap)
    out = op(x, sublayer)
    ref_out, ref_beta = hand(op, cfg, x, reads_ln=beta_input == "ln")
    torch.testing.assert_close(got["beta"], ref_beta.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    # the other reading gives a clearly different beta here (the test would notice a swapped input)
    other = hand(op, cfg, x, reads_ln=beta_input != "ln")[1]
    assert (other - ref_beta).abs().max() > 1e-2


def test_default_is_x_and_bit_identical_to_explicit_x(x):
    assert MGTConfig().beta_input == "x"
    for fused in (True, False):
        _, a = make_op(fused=fused)
        _, b = make_op(fused=fused, beta_input="x")
        assert torch.equal(a(x, sublayer), b(x, sublayer))


def test_ln_gradients_reach_beta_weights_through_ln(x):
    """Gradients of the fused path equal the op-by-op path's with beta reading LN(X) (fp64)."""
    xs = x.clone().requires_grad_(True)
    grads = []
    for fused in (True, False):
        _, op = make_op(fused=fused, beta_input="ln", proj_rank=3)
        xs.grad = None
        op(xs, sublayer).pow(2).sum().backward()
        grads.append([xs.grad.clone()] + [p.grad.clone() for p in op.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_config_accepts_x_ln_and_refuses_others(tmp_path):
    assert load_config(None, ["model.mgt.beta_input=ln", "data.synthetic=random"]).model.mgt.beta_input == "ln"
    with pytest.raises(ConfigError, match="model.mgt.beta_input"):
        load_config(None, ["model.mgt.beta_input=normed", "data.synthetic=random"])
    with pytest.raises(ConfigError, match="model.mgt.beta_input"):
        from_dict({"model": {"mgt": {"beta_input": 1}}, "data": {"synthetic": "random"}})


def test_monitor_beta_statistics_are_of_the_ln_beta():
    from mgt_scale.monitor.probe import capture_probe
    cfg = ModelConfig(num_layers=2, d_model=D, num_heads=2, d_ff=16, vocab_size=40, residual="mgt",
                      mgt=MGTConfig(beta_input="ln"))
    model = build_model(cfg, seed=0).double()
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    hiddens, ops = capture_probe(model, tokens)
    op = model.blocks[0].attn_res
    with torch.no_grad():
        w_beta = op.gate_beta[D:]
        beta = torch.tanh(ln_ref(hiddens[0], op.norm_weight, op.norm_bias) @ w_beta.T + op.beta_bias)
        raw = torch.tanh(hiddens[0] @ w_beta.T + op.beta_bias)
    assert ops[0]["block"] == 0 and ops[0]["kind"] == "attn"
    assert ops[0]["beta_mean"] == pytest.approx(float(beta.mean()), rel=1e-12)
    assert ops[0]["beta_std"] == pytest.approx(float(beta.std(unbiased=False)), rel=1e-10)
    # at init LN(X) W_beta has unit variance (fan_in init), X W_beta the stream's (~0.02): beta spreads
    assert float(beta.std()) > 0.1 > float(raw.std())
    assert not math.isclose(ops[0]["beta_std"], float(raw.std(unbiased=False)), rel_tol=0.5)


@pytest.mark.parametrize("kind", ["preln", "postln", "deepnorm", "mhc", "mhc_gate", "ddl_delta"])
def test_ln_with_a_kind_without_beta_is_refused(kind):
    """Before: accepted and silently without effect (these kinds have no beta)."""
    with pytest.raises(ConfigError, match="model.mgt.beta_input"):
        load_config(None, ["model.mgt.beta_input=ln", f"model.residual={kind}", "data.synthetic=random"])
    assert load_config(None, [f"model.residual={kind}", "data.synthetic=random"]).model.mgt.beta_input == "x"
    for ok in ("mgt", "ddl"):
        load_config(None, ["model.mgt.beta_input=ln", f"model.residual={ok}", "data.synthetic=random"])
