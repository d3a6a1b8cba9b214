# The published baselines (`mhc`: DeepSeek's manifold-constrained hyper-connections; `ddl_delta`: Deep Delta
# Learning's delta operator) against independent hand-computed references on tiny tensors: Sinkhorn-Knopp
# output doubly stochastic (and the closed form of the 2 x 2 limit), mHC's coefficients and mixing
# against loops over the formulas, n = 1 with identity mixing equal to pre-LN bit for bit, the delta
# operator's three limits (beta 0, 1, 2) on known k, activation checkpointing unchanged, and
# `mgt probe --json` reporting H_res's row/column sum deviation (mhc) and beta's distribution (ddl_delta).
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from mgt_scale.config import DDLDeltaConfig, MHCConfig, ModelConfig, load_config
from mgt_scale.model import build_model
from mgt_scale.model.residual_baselines import (DeltaResidual, MHCResidual, delta_update, expand_streams,
                                                reduce_streams, sinkhorn_knopp)

SMALL = dict(num_layers=2, d_model=8, num_heads=2, d_ff=16, vocab_size=31, max_seq_len=12)


def sinkhorn_reference(logits, iters):
    """Plain Python lists: exp, then columns then rows normalised, `iters` times."""
    n = len(logits)
    m = [[math.exp(v) for v in row] for row in logits]
    for _ in range(iters):
        cols = [sum(m[i][j] for i in range(n)) for j in range(n)]
        m = [[m[i][j] / cols[j] for j in range(n)] for i in range(n)]
        m = [[v / sum(row) for v in row] for row in m]
    return m


# ---------------------------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_sinkhorn_output_is_doubly_stochastic(n):
    logits = torch.randn(3, 5, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    m = sinkhorn_knopp(logits, 20)
    assert (m >= 0).all()
    assert (m.sum(-1) - 1).abs().max() < 1e-4
    assert (m.sum(-2) - 1).abs().max() < 1e-4
    ref = torch.tensor([[sinkhorn_reference(logits[a, b].tolist(), 20) for b in range(5)] for a in range(3)],
                       dtype=torch.float64)
    torch.testing.assert_close(m, ref, rtol=0, atol=1e-12)


def test_sinkhorn_2x2_limit_by_hand():
    """A positive 2 x 2 matrix [[a, b], [c, d]] scales to [[p, 1-p], [1-p, p]] with
    p = sqrt(ad) / (sqrt(ad) + sqrt(bc)): for [[1, 2], [3, 4]], p = 2 / (2 + sqrt 6)."""
    m = sinkhorn_knopp(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).log(), 20)
    p = 2 / (2 + math.sqrt(6))
    torch.testing.assert_close(m, torch.tensor([[p, 1 - p], [1 - p, p]], dtype=torch.float64), rtol=0, atol=1e-6)


def test_sinkhorn_large_logits_stay_finite():
    m = sinkhorn_knopp(torch.tensor([[200.0, 0.0], [0.0, 150.0]]), 20)
    assert torch.isfinite(m).all() and (m.sum(-2) - 1).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- mHC
def test_expand_and_reduce_streams():
    x = torch.arange(6.0).view(1, 2, 3)
    e = expand_streams(x, 4)
    assert e.shape == (1, 2, 12) and torch.equal(e.view(1, 2, 4, 3)[:, :, 2], x)
    assert torch.equal(reduce_streams(e, 4), 4 * x)
    assert expand_streams(x, 1) is x and reduce_streams(x, 1) is x


def test_mhc_coefficients_and_mixing_match_the_formulas():
    """coefficients(): r = RMS(vec x), z = x phi / r, H_pre = sigmoid(a_pre z_pre + b_pre), H_post =
    2 sigmoid(a_post z_post + b_post), H_res = Sinkhorn(a_res mat(z_res) + b_res); then
    out_i = sum_j H_res[i, j] x_j + H_post[i] F(LN(sum_j H_pre[j] x_j)), token by token with loops."""
    n, d = 3, 4
    cfg = ModelConfig(**dict(SMALL, d_model=d), residual="mhc", mhc=MHCConfig(num_streams=n))
    op = MHCResidual(cfg, sublayer_index=1)
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        op.vectors.add_(0.5 * torch.randn(op.vectors.shape, generator=torch.Generator().manual_seed(1)))
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, n * d, generator=torch.Generator().manual_seed(3))
    out = op(x, lambda h: h @ w)
    v = op._views()
    for b in range(2):
        for t in range(3):
            xt = x[b, t]
            r = math.sqrt(float((xt ** 2).mean()) + cfg.norm_eps)
            z = (op.phi @ xt) / r
            a = v["scales"]
            h_pre = torch.sigmoid(a[0] * z[:n] + v["pre_bias"])
            h_post = 2 * torch.sigmoid(a[1] * z[n:2 * n] + v["post_bias"])
            h_res = torch.tensor(sinkhorn_reference((a[2] * z[2 * n:] + v["res_bias"]).view(n, n).tolist(), 20))
            streams = xt.view(n, d)
            x_in = sum(h_pre[j] * streams[j] for j in range(n))
            f = F.layer_norm(x_in, (d,), v["norm_weight"], v["norm_bias"], cfg.norm_eps) @ w
            ref = torch.stack([sum(h_res[i, j] * streams[j] for j in range(n)) + h_post[i] * f for i in range(n)])
            torch.testing.assert_close(out[b, t].view(n, d), ref, rtol=0, atol=1e-5)


def test_mhc_init_is_near_identity_mixing_and_cycles_the_read_stream():
    """n = 4, g = 2: H_pre ~ sigmoid(+-2) = 0.88 on stream (sublayer mod n) / 0.12 elsewhere, H_post ~ 1,
    H_res ~ Sinkhorn of [[1, e^-2, ...], ...] = 1 / (1 + 3 e^-2) = 0.711 on the diagonal."""
    cfg = ModelConfig(**SMALL, residual="mhc")
    op = MHCResidual(cfg, sublayer_index=6)
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    h_pre, h_post, h_res = op.coefficients(torch.randn(1, 5, 4 * SMALL["d_model"]), op._views())
    assert h_pre.argmax(-1).eq(6 % 4).all()
    torch.testing.assert_close(h_pre.max(-1).values, torch.full((1, 5), 0.8808), rtol=0, atol=0.02)
    torch.testing.assert_close(h_post, torch.ones_like(h_post), rtol=0, atol=0.05)
    torch.testing.assert_close(h_res.diagonal(dim1=-2, dim2=-1), torch.full((1, 5, 4), 1 / (1 + 3 * math.exp(-2))),
                               rtol=0, atol=0.02)


def test_mhc_with_one_stream_and_identity_mixing_is_preln_exactly():
    """n = 1, a_* = 0, b_pre large (sigmoid = 1.0 in fp32), b_post = 0 (2 sigmoid(0) = 1): H_pre = H_post =
    H_res = 1, so the whole model's logits are pre-LN's, bit for bit (same seed: the same attention, FFN,
    embedding and head weights; the LayerNorms copied)."""
    pre = build_model(ModelConfig(**SMALL, residual="preln"), seed=5)
    mhc = build_model(ModelConfig(**SMALL, residual="mhc", mhc=MHCConfig(num_streams=1)), seed=5)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for bp, bm in zip(pre.blocks, mhc.blocks):
            assert torch.equal(bp.attn.qkv.weight, bm.attn.qkv.weight)
            for op_p, op_m in ((bp.attn_res, bm.attn_res), (bp.ffn_res, bm.ffn_res)):
                op_p.vectors.add_(0.3 * torch.randn(op_p.vectors.shape, generator=gen))  # LN weights not 1/0
                op_m.vector("norm_weight").copy_(op_p.vector("norm_weight"))
                op_m.vector("norm_bias").copy_(op_p.vector("norm_bias"))
                op_m.vector("scales").zero_()
                op_m.vector("pre_bias").fill_(30.0)
                op_m.vector("post_bias").zero_()
                op_m.vector("res_bias").normal_(generator=gen)  # a 1 x 1 Sinkhorn is 1 whatever the logit
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=gen)
    with torch.no_grad():
        assert torch.equal(mhc(tokens), pre(tokens))


# ---------------------------------------------------------------------------------------------- DDL delta
@pytest.mark.parametrize("k", [[0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
def test_delta_update_three_limits(k):
    """beta 0: identity; beta 1: k^T x_next = v and the part orthogonal to k unchanged (projection, then v
    written); beta 2, v = 0: the Householder reflection x - 2 (k^T x) k, norm preserved. Hand values:
    x = (1, 2, 3); k = e_2: beta 1, v 0.5 -> (1, 0.5, 3); beta 2 -> (1, -2, 3). k = (0.6, 0.8, 0):
    k^T x = 2.2; beta 1, v 0.5 -> x - 1.7 k = (-0.02, 0.64, 3); beta 2 -> x - 4.4 k = (-1.64, -1.52, 3)."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    kt = torch.tensor(k, dtype=torch.float64)
    by_hand = {(0.0, 1.0, 0.0): ((1, 0.5, 3), (1, -2, 3)), (0.6, 0.8, 0.0): ((-0.02, 0.64, 3), (-1.64, -1.52, 3))}
    proj1, refl = (torch.tensor(v, dtype=torch.float64) for v in by_hand[tuple(k)])
    one = lambda v: torch.tensor([v], dtype=torch.float64)
    assert torch.equal(delta_update(x, kt, one(0.5), one(0.0)), x)
    out1 = delta_update(x, kt, one(0.5), one(1.0))
    torch.testing.assert_close(out1, proj1, rtol=0, atol=1e-12)
    assert abs(float(kt @ out1) - 0.5) < 1e-12
    perp = lambda y: y - (kt @ y) * kt
    torch.testing.assert_close(perp(out1), perp(x), rtol=0, atol=1e-12)
    out2 = delta_update(x, kt, one(0.0), one(2.0))
    torch.testing.assert_close(out2, refl, rtol=0, atol=1e-12)
    assert abs(float(out2.norm()) - math.sqrt(14)) < 1e-12


@pytest.mark.parametrize("beta_bias,beta", [(-100.0, 0.0), (0.0, 1.0), (100.0, 2.0)])
def test_delta_residual_op_limits_with_a_known_direction(beta_bias, beta):
    """The operator end to end: a sublayer that returns 5 k (k known) gives the direction k; w_beta = 0 and
    b_beta = -100 / 0 / +100 give beta = 0 / 1 / 2; value: norm with w_v = 0 and b_v = 0.7 gives v = 0.7."""
    d = 4
    cfg = ModelConfig(**dict(SMALL, d_model=d), residual="ddl_delta", ddl_delta=DDLDeltaConfig(value="norm"))
    op = DeltaResidual(cfg)
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    k = torch.tensor([0.5, -0.5, 0.5, 0.5])
    with torch.no_grad():
        op.beta_value.zero_()
        op.vector("beta_bias").fill_(beta_bias)
        op.vector("value_bias").fill_(0.7)
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(1))
    seen = {}
    op.stats_sink = lambda _op, cap: seen.update(cap)
    out = op(x, lambda c: 5.0 * k.expand_as(c))
    proj = x @ k
    ref = x + beta * (0.7 - proj).unsqueeze(-1) * k
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    if beta == 1.0:
        torch.testing.assert_close(out @ k, torch.full_like(proj, 0.7), rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["beta"], torch.full((2, 3, 1), beta), rtol=0, atol=1e-6)


def test_delta_value_modes_and_init():
    """stream (authors' code): v = 4 sigmoid(w_v^T X + b_v) = 2 at w_v = 0; beta starts at beta_init."""
    cfg = ModelConfig(**SMALL, residual="ddl_delta", ddl_delta=DDLDeltaConfig(beta_init=0.4))
    op = DeltaResidual(cfg)
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        op.beta_value.zero_()
    seen = {}
    op.stats_sink = lambda _op, cap: seen.update(cap)
    op(torch.randn(1, 4, SMALL["d_model"]), lambda c: c + 1.0)
    torch.testing.assert_close(seen["delta_value"], torch.full((1, 4, 1), 2.0))
    torch.testing.assert_close(seen["beta"], torch.full((1, 4, 1), 0.4))


# ---------------------------------------------------------------------------------------------- stack
@pytest.mark.parametrize("kind", ["mhc", "ddl_delta"])
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_and_gradients(kind, policy):
    from mgt_scale.model import lm_loss
    cfg = ModelConfig(**SMALL, residual=kind)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for every in (0, 1):
        model = build_model(cfg, seed=1)
        from mgt_scale.config import ParallelConfig
        from mgt_scale.parallel.checkpointing import apply_activation_checkpointing
        apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=every > 0, checkpoint_policy=policy))
        loss = lm_loss(model(tokens), tokens)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["mhc", "ddl_delta"])
def test_probe_json_reports_the_operator_statistics(kind, tmp_path):
    from mgt_scale.commands.probe import main
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": dict(SMALL, num_layers=3, residual=kind), "data": {"synthetic": "copy",
                                        "seq_len": 12}, "monitor": {"probe_seq_len": 12, "probe_batch_size": 2}}))
    out = tmp_path / "probe.json"
    assert main(["--config", str(cfg_file), "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["residual"] == kind and len(rec["layers"]) == 4
    ops = rec["ops"]
    assert [(o["block"], o["kind"]) for o in ops] == [(b, k) for b in range(3) for k in ("attn", "ffn")]
    # independent: the same model and probe batch, H_res / beta taken from the operators' sinks
    from mgt_scale.train.monitor_callback import probe_tokens
    cfg = load_config(cfg_file)
    model = build_model(cfg.model, seed=cfg.train.seed).eval().double()  # `mgt probe` runs in float64
    caps = []
    for b in model.blocks:
        for op in (b.attn_res, b.ffn_res):
            op.stats_sink = lambda _op, cap: caps.append(cap)
    with torch.no_grad():
        model(probe_tokens(cfg, cfg.model.vocab_size))
    for o, cap in zip(ops, caps):
        if kind == "mhc":
            h = cap["h_res"].double()
            assert o["h_res_row_dev"] == pytest.approx(float((h.sum(-1) - 1).abs().max()), abs=1e-12)
            assert o["h_res_col_dev"] == pytest.approx(float((h.sum(-2) - 1).abs().max()), abs=1e-12)
            assert 0 <= o["h_res_row_dev"] <= 1e-4 and 0 <= o["h_res_col_dev"] <= 1e-4
            assert 0.6 < o["h_res_diag_mean"] < 0.8 and o["beta_mean"] is None
        else:
            q = o["beta_quantiles"]
            b = cap["beta"].double().reshape(-1)
            assert q == pytest.approx([float(b.min()), float(b.quantile(0.1)), float(b.quantile(0.5)),
                                       float(b.quantile(0.9)), float(b.max())], abs=1e-12)
            assert len(q) == 5 and q == sorted(q) and 0 < q[0] and q[-1] < 2
            assert abs(o["beta_mean"] - 1.0) < 0.3 and o["beta_std"] > 0  # beta_init 1, random w_beta
