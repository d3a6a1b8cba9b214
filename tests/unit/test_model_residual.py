# Residual operators against independent hand-written fp64 references, and the properties the MGT
# update must have (beta -> 0 is the identity, negative beta erases, the gate lies in (0, 1)).
import dataclasses
import math

import pytest
import torch

from mgt_scale.config import MGTConfig, ModelConfig
from mgt_scale.model import ResidualOp, build_model, deepnorm_constants, mgt_update

D = 16


def make_op(kind, **mgt):
    cfg = ModelConfig(num_layers=6, d_model=D, num_heads=2, d_ff=32, vocab_size=50, residual=kind,
                      mgt=MGTConfig(**mgt))
    op = ResidualOp(cfg).double()
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():  # make every parameter non-trivial so the reference is really exercised
        for p in op.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return cfg, op


def ln_ref(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def sublayer(x):  # any fixed nonlinear function stands in for attention / FFN
    return torch.tanh(x @ torch.linspace(-1, 1, D * D, dtype=x.dtype).reshape(D, D)) + 0.1 * x


@pytest.fixture
def x():
    return torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_preln(x):
    _, op = make_op("preln")
    ref = x + sublayer(ln_ref(x, op.norm_weight, op.norm_bias))
    torch.testing.assert_close(op(x, sublayer), ref, rtol=1e-12, atol=1e-12)


def test_postln_matches_published_formula(x):
    _, op = make_op("postln")
    ref = ln_ref(x + sublayer(x), op.norm_weight, op.norm_bias)
    torch.testing.assert_close(op(x, sublayer), ref, rtol=1e-12, atol=1e-12)


def test_deepnorm_matches_published_formula(x):
    cfg, op = make_op("deepnorm")
    a = (2 * cfg.num_layers) ** 0.25
    assert deepnorm_constants(cfg.num_layers) == pytest.approx((a, (8 * cfg.num_layers) ** -0.25))
    ref = ln_ref(a * x + sublayer(x), op.norm_weight, op.norm_bias)
    torch.testing.assert_close(op(x, sublayer), ref, rtol=1e-12, atol=1e-12)


def _gate_beta_ref(op, x, cfg):
    W = op.gate_beta
    g = torch.sigmoid(ln_ref(x @ W[:D].T, op.gate_norm_weight, op.gate_norm_bias)) if op.use_gate else None
    rows = W[op.gate_rows:]
    beta = (cfg.mgt.lam * torch.tanh(x @ rows.T + op.beta_bias) + cfg.mgt.eps) if op.use_beta else None
    return g, beta


@pytest.mark.parametrize("beta_shape", ["channel", "token"])
@pytest.mark.parametrize("alpha_shape", ["scalar", "channel"])
@pytest.mark.parametrize("fused", [True, False])
def test_mgt_full(x, beta_shape, alpha_shape, fused):
    cfg, op = make_op("mgt", beta_shape=beta_shape, alpha_shape=alpha_shape, fused=fused, lam=0.8, eps=0.1)
    g, beta = _gate_beta_ref(op, x, cfg)
    v = sublayer(ln_ref(x, op.norm_weight, op.norm_bias)) * g
    ref = x + beta * (v - op.alpha * x)
    assert beta.shape[-1] == (D if beta_shape == "channel" else 1)
    torch.testing.assert_close(op(x, sublayer), ref, rtol=1e-12, atol=1e-12)


def test_mhc_gate(x):
    cfg, op = make_op("mhc_gate")
    g, _ = _gate_beta_ref(op, x, cfg)
    ref = x + sublayer(ln_ref(x, op.norm_weight, op.norm_bias)) * g
    torch.testing.assert_close(op(x, sublayer), ref, rtol=1e-12, atol=1e-12)
    assert ((g > 0) & (g < 1)).all()


def test_ddl(x):
    cfg, op = make_op("ddl")
    _, beta = _gate_beta_ref(op, x, cfg)
    ref = x + beta * (sublayer(ln_ref(x, op.norm_weight, op.norm_bias)) - op.alpha * x)
    torch.testing.assert_close(op(x, sublayer), ref, rtol=1e-12, atol=1e-12)


def test_gate_in_open_unit_interval_captured(x):
    _, op = make_op("mgt")
    seen = {}
    op.stats_sink = lambda o, s: seen.update(s)
    op(x * 50, sublayer)  # large inputs: still strictly inside (0, 1) before saturation to fp64 limits
    assert ((seen["gate"] > 0) & (seen["gate"] < 1)).all()


def test_beta_to_zero_is_identity(x):
    cfg, op = make_op("mgt", lam=1.0, eps=0.0)
    with torch.no_grad():
        op.gate_beta[op.gate_rows:].zero_()
        op.beta_bias.zero_()  # beta = tanh(0) + 0 = 0
    torch.testing.assert_close(op(x, sublayer), x, rtol=0, atol=0)


def test_negative_beta_erases_component_along_x(x):
    # V parallel to X with coefficient c > alpha: X + beta (c - alpha) X shrinks X along itself iff beta < 0
    alpha = torch.tensor(0.2, dtype=torch.float64)
    v = 1.5 * x
    for beta, shrinks in ((-0.4, True), (0.4, False)):
        out = mgt_update(x, v, torch.tensor(beta, dtype=torch.float64), alpha)
        along = (out * x).sum(-1) / (x * x).sum(-1)  # coefficient of X in out
        assert bool((along < 1).all()) == shrinks
        torch.testing.assert_close(along, torch.full_like(along, 1 + beta * (1.5 - 0.2)))


def test_low_rank_projection_shapes_and_matches_product(x):
    cfg, op = make_op("mgt", proj_rank=4)
    W = op.gate_beta_up @ op.gate_beta_down
    g = torch.sigmoid(ln_ref(x @ W[:D].T, op.gate_norm_weight, op.gate_norm_bias))
    beta = torch.tanh(x @ W[D:].T + op.beta_bias)
    ref = x + beta * (sublayer(ln_ref(x, op.norm_weight, op.norm_bias)) * g - op.alpha * x)
    torch.testing.assert_close(op(x, sublayer), ref, rtol=1e-12, atol=1e-12)


def test_init_is_independent_of_build_order_and_documented_values():
    cfg = ModelConfig(num_layers=3, d_model=D, num_heads=2, d_ff=32, vocab_size=50)
    a, b = build_model(cfg, seed=7), build_model(cfg, seed=7)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    op = a.blocks[1].attn_res
    assert torch.all(op.beta_bias == cfg.mgt.beta_bias_init) and torch.all(op.alpha == cfg.mgt.alpha_init)
    std = a.blocks[0].ffn.down.weight.std().item()
    assert std == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.num_layers), rel=0.15)
    c = build_model(cfg, seed=8)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("residual,mgt", [
    ("mgt", {}),
    ("mgt", {"proj_rank": 4, "beta_shape": "token"}),
    ("mgt", {"proj_rank": 4, "alpha_shape": "channel", "lam": 0.7, "eps": 0.05}),
    ("mgt", {"beta_shape": "token", "alpha_shape": "channel"}),
    ("mhc_gate", {}),
    ("ddl", {"lam": 1.3, "eps": -0.1}),
    ("ddl", {"proj_rank": 4}),
])
def test_fused_path_matches_reference_in_fp32(residual, mgt):
    """The fused path (one projection matmul, beta through sigmoid, addcmul updates) against the paper's
    formulas op by op, fp32, in a whole model with alpha moved off its zero init."""
    torch.manual_seed(0)
    grads = {}
    for fused in (True, False):
        cfg = ModelConfig(num_layers=2, d_model=D, num_heads=2, d_ff=32, vocab_size=50, residual=residual,
                          mgt=MGTConfig(fused=fused, **mgt))
        model = build_model(cfg, seed=3)
        ops = [m for m in model.modules() if isinstance(m, ResidualOp) and m.use_beta]
        assert len(ops) == (4 if residual != "mhc_gate" else 0)
        with torch.no_grad():
            for op in ops:
                op.alpha.copy_(torch.linspace(-0.4, 0.6, op.alpha.numel()))
        tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(5))
        out = model(tokens)
        out.square().mean().backward()
        grads[fused] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-6, atol=1e-6)
    for n, g in grads[True][1].items():
        torch.testing.assert_close(g, grads[False][1][n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("residual,mgt,layout", [
    ("preln", {}, [("norm_weight", D, 1.0), ("norm_bias", D, 0.0)]),
    ("mgt", {}, [("norm_weight", D, 1.0), ("norm_bias", D, 0.0), ("gate_norm_weight", D, 1.0),
                 ("gate_norm_bias", D, 0.0), ("beta_bias", D, 0.5), ("alpha", 1, 0.0)]),
    ("mgt", {"beta_shape": "token", "alpha_shape": "channel", "beta_bias_init": 0.25, "alpha_init": 0.1},
     [("norm_weight", D, 1.0), ("norm_bias", D, 0.0), ("gate_norm_weight", D, 1.0), ("gate_norm_bias", D, 0.0),
      ("beta_bias", 1, 0.25), ("alpha", D, 0.1)]),
    ("ddl", {}, [("norm_weight", D, 1.0), ("norm_bias", D, 0.0), ("beta_bias", D, 0.5), ("alpha", 1, 0.0)]),
])
def test_small_vectors_are_packed_in_one_parameter_in_documented_order(residual, mgt, layout):
    """LN weights and biases, b_beta and alpha sit at fixed offsets of `vectors` (written out here, not
    derived from the operator), the named views share its storage, and a block has 4 matmul weights plus
    2 parameters per operator (`vectors`, `gate_beta`): ZeRO-3's per-tensor cost is why."""
    cfg, op = make_op(residual, **mgt)
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    assert [n for n, _ in op.named_parameters()] == (["gate_beta"] if residual != "preln" else []) + ["vectors"]
    start = 0
    for name, size, value in layout:
        part = op.vectors[start: start + size]
        assert torch.all(part == value), name
        assert getattr(op, name).data_ptr() == part.data_ptr() and getattr(op, name).numel() == size, name
        start += size
    assert start == op.vectors.numel()
    model = build_model(ModelConfig(num_layers=2, d_model=D, num_heads=2, d_ff=32, vocab_size=50,
                                    residual=residual, mgt=MGTConfig(**mgt)))
    assert len(list(model.blocks[0].parameters())) == 4 + 2 * (2 if residual != "preln" else 1)


@pytest.mark.parametrize("residual", ["mgt", "preln"])
def test_state_dict_with_one_key_per_vector_still_loads(residual):
    """A state dict of the layout before packing (`attn_res.norm.weight`, ..., `attn_res.alpha`, the keys
    of mgt-scale 0.1, written out here) loads strictly into the packed model, every value where it was."""
    old_keys = {"norm_weight": "norm.weight", "norm_bias": "norm.bias", "gate_norm_weight": "gate_norm.weight",
                "gate_norm_bias": "gate_norm.bias", "beta_bias": "beta_bias", "alpha": "alpha"}
    cfg = ModelConfig(num_layers=2, d_model=D, num_heads=2, d_ff=32, vocab_size=50, residual=residual,
                      mgt=MGTConfig(beta_shape="token"))
    src = build_model(cfg, seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in src.parameters():  # every value distinct, so a vector loaded into another place shows
            p.copy_(torch.randn(p.shape, generator=gen))
    legacy = {}
    for key, value in src.state_dict().items():
        if not key.endswith(".vectors"):
            legacy[key] = value
            continue
        op = src.get_submodule(key[: -len(".vectors")])
        for name in op.vector_names:
            legacy[key[: -len("vectors")] + old_keys[name]] = op.vector(name).detach().clone()
    assert any(k.endswith("gate_norm.weight") for k in legacy) == (residual == "mgt")
    dst = build_model(cfg, seed=2)
    dst.load_state_dict(legacy, strict=True)
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n
    if residual == "mgt":  # a legacy dict of another shape (d values of b_beta, not 1) names the key
        with pytest.raises(RuntimeError, match="vectors"):
            build_model(dataclasses.replace(cfg, mgt=MGTConfig()), seed=2).load_state_dict(legacy)
