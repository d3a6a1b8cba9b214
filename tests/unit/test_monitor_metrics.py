# Unit tests of mgt_scale.monitor.metrics: geometry metrics against numpy/scipy references on
# matrices of known rank (identity, rank 1, Gaussian, low rank + noise), degenerate inputs, the
# batched layer_geometry path, and the MGT operator statistics.
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from mgt_scale.monitor.metrics import (BETA_HIST_EDGES, LAYER_KEYS, OP_KEYS, geometry_summary, hidden_geometry,
                                       layer_geometry, make_geometry_record, mgt_op_stats, per_sequence_geometry,
                                       summarise_mgt_ops)


def reference(a: np.ndarray, center: bool = False) -> dict:
    """Straightforward numpy/scipy version of every metric for one tokens x width matrix."""
    a = np.asarray(a, dtype=np.float64)
    t, d = a.shape
    m = a - a.mean(axis=0, keepdims=True) if center else a
    s = np.linalg.svd(m, compute_uv=False)
    eff = math.exp(scipy.stats.entropy(s / s.sum()))
    norms = np.linalg.norm(a, axis=1)
    u = a / norms[:, None]
    g = u @ u.T
    cos = (g.sum() - np.trace(g)) / (t * (t - 1))
    return {
        "eff_rank": eff,
        "eff_rank_norm": eff / min(t, d),
        "stable_rank": (s**2).sum() / s[0] ** 2,
        "cosine": cos,
        "rank1_residual": math.sqrt((s[1:] ** 2).sum()) / np.linalg.norm(m),
        "norm": norms.mean(),
    }


def batch_reference(x: np.ndarray, center: bool = False) -> dict:
    refs = [reference(a, center) for a in x]
    return {k: float(np.mean([r[k] for r in refs])) for k in refs[0]}


def assert_close(got: dict, want: dict, rtol=1e-9, atol=1e-10):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rtol, abs=atol), k


def test_identity_has_full_effective_rank():
    g = hidden_geometry(torch.eye(16, dtype=torch.float64).expand(3, 16, 16))
    assert g["eff_rank"] == pytest.approx(16.0, rel=1e-12)
    assert g["eff_rank_norm"] == pytest.approx(1.0, rel=1e-12)
    assert g["stable_rank"] == pytest.approx(16.0, rel=1e-12)
    assert g["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert g["rank1_residual"] == pytest.approx(math.sqrt(15 / 16), rel=1e-12)
    assert g["norm"] == pytest.approx(1.0)


def test_wide_identity_normalises_by_token_count():
    a = torch.zeros(8, 32, dtype=torch.float64)
    a[:, :8] = torch.eye(8)
    g = hidden_geometry(a[None])
    assert g["eff_rank"] == pytest.approx(8.0, rel=1e-12)
    assert g["eff_rank_norm"] == pytest.approx(1.0, rel=1e-12)


def test_positive_rank_one_is_collapsed():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(24, generator=gen, dtype=torch.float64) + 0.5
    v = torch.rand(40, generator=gen, dtype=torch.float64) + 0.1
    a = torch.outer(w, v)
    g = hidden_geometry(a[None])
    assert g["eff_rank"] == pytest.approx(1.0, abs=1e-6)
    assert g["eff_rank_norm"] == pytest.approx(1 / 24, rel=1e-5)
    assert g["stable_rank"] == pytest.approx(1.0, abs=1e-9)
    assert g["rank1_residual"] < 1e-7
    assert g["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert g["norm"] == pytest.approx(float(w.mean() * v.norm()), rel=1e-12)


def test_opposite_tokens_have_negative_cosine():
    v = torch.randn(10, dtype=torch.float64)
    a = torch.stack([v, -v])
    assert hidden_geometry(a[None])["cosine"] == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(3, 20, 12), (2, 12, 20), (1, 7, 7)])
def test_gaussian_matches_numpy_reference(shape):
    x = np.random.default_rng(1).standard_normal(shape)
    per_seq = per_sequence_geometry(torch.from_numpy(x))
    for n in range(shape[0]):
        assert_close({k: float(v[n]) for k, v in per_seq.items()}, reference(x[n]))
    assert_close(hidden_geometry(torch.from_numpy(x)), batch_reference(x))


def test_low_rank_plus_noise_matches_reference_and_is_low():
    rng = np.random.default_rng(2)
    x = np.stack([rng.standard_normal((32, 3)) @ rng.standard_normal((3, 48)) + 1e-3 * rng.standard_normal((32, 48))
                  for _ in range(4)])
    g = hidden_geometry(torch.from_numpy(x))
    assert_close(g, batch_reference(x))
    assert 2.0 < g["eff_rank"] < 4.0
    assert g["eff_rank_norm"] == pytest.approx(g["eff_rank"] / 32)
    assert g["stable_rank"] < 3.0


def test_centering_option_matches_centred_reference():
    x = np.random.default_rng(3).standard_normal((2, 16, 24)) + 5.0  # a big common mean component
    raw = hidden_geometry(torch.from_numpy(x))
    cen = hidden_geometry(torch.from_numpy(x), center=True)
    assert_close(cen, batch_reference(x, center=True))
    assert cen["eff_rank"] > raw["eff_rank"]  # the common mean is one dominant direction
    assert cen["cosine"] == raw["cosine"] and cen["norm"] == raw["norm"]  # always on raw tokens


def test_degenerate_inputs():
    z = hidden_geometry(torch.zeros(2, 5, 7))
    assert all(z[k] == 0.0 for k in ("eff_rank", "eff_rank_norm", "stable_rank", "rank1_residual", "cosine", "norm"))
    one = hidden_geometry(torch.randn(2, 1, 7))
    assert math.isnan(one["cosine"]) and one["eff_rank"] == pytest.approx(1.0)
    # a zero-norm token counts as cosine 0 with the others
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert hidden_geometry(a[None])["cosine"] == pytest.approx(2 / 6)


def test_non_finite_sequence_gives_nan_without_raising():
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    x[1, 2, 3] = float("nan")
    per_seq = per_sequence_geometry(x)
    for v in per_seq.values():
        assert math.isnan(float(v[1])) and math.isfinite(float(v[0])) and math.isfinite(float(v[2]))
    assert math.isnan(hidden_geometry(x)["eff_rank"])


def test_layer_geometry_matches_per_layer_and_chunks():
    gen = torch.Generator().manual_seed(4)
    hiddens = [torch.randn(2, 10, 16, generator=gen) * (i + 1) for i in range(5)]
    hiddens[3] = hiddens[3][:, :, :1].expand(2, 10, 16).contiguous()  # a collapsed layer
    layers = layer_geometry(hiddens)
    assert [l["layer"] for l in layers] == list(range(5))
    assert all(tuple(l) == LAYER_KEYS for l in layers)
    for i, (l, h) in enumerate(zip(layers, hiddens)):
        want = batch_reference(h.double().numpy()) if i != 3 else None
        if want:
            assert_close(l, want)
    assert layers[3]["eff_rank"] == pytest.approx(1.0, abs=1e-6)
    chunked = layer_geometry(hiddens, max_elements=2 * 10 * 16 * 2)  # two layers per SVD call
    for a, b in zip(layers, chunked):
        assert_close(a, {k: v for k, v in b.items()}, rtol=1e-12)


def test_layer_geometry_mixed_shapes_and_dtypes():
    hs = [torch.randn(2, 6, 8, dtype=torch.bfloat16), torch.randn(2, 6, 8), torch.randn(3, 4, 8)]
    layers = layer_geometry(hs)
    assert len(layers) == 3 and [l["layer"] for l in layers] == [0, 1, 2]
    assert_close(layers[2], batch_reference(hs[2].double().numpy()))
    assert_close(layers[0], batch_reference(hs[0].double().numpy()))


def test_geometry_summary():
    layers = [{"layer": 0, "eff_rank": 10.0, "eff_rank_norm": 0.8, "cosine": 0.1},
              {"layer": 1, "eff_rank": 2.0, "eff_rank_norm": 0.2, "cosine": float("nan")},
              {"layer": 2, "eff_rank": 4.0, "eff_rank_norm": 0.4, "cosine": 0.7}]
    s = geometry_summary(layers)
    assert s["min_eff_rank_norm"] == 0.2 and s["min_eff_rank_norm_layer"] == 1
    assert s["last_eff_rank"] == 4.0 and s["max_cosine"] == 0.7 and s["max_cosine_layer"] == 2


def test_mgt_op_stats_against_numpy():
    rng = np.random.default_rng(5)
    beta = rng.uniform(-1.8, 1.2, size=(2, 7, 16))  # some values outside the histogram range
    gate = rng.uniform(0, 1, size=(2, 7, 16))
    x = rng.standard_normal((2, 7, 16))
    upd = 0.3 * rng.standard_normal((2, 7, 16))
    st = mgt_op_stats(torch.from_numpy(beta), torch.from_numpy(gate), torch.tensor([0.1, 0.3]),
                      torch.from_numpy(upd), torch.from_numpy(x))
    assert set(st) == set(OP_KEYS)
    assert st["beta_mean"] == pytest.approx(beta.mean())
    assert st["beta_std"] == pytest.approx(beta.std())
    assert st["beta_frac_negative"] == pytest.approx((beta < 0).mean())
    want_hist, _ = np.histogram(np.clip(beta, -1.5, 1.5), bins=BETA_HIST_EDGES)
    assert st["beta_hist"] == want_hist.tolist() and sum(st["beta_hist"]) == beta.size
    assert st["gate_mean"] == pytest.approx(gate.mean())
    assert st["gate_saturation"] == pytest.approx(((gate < 0.05) | (gate > 0.95)).mean())
    assert st["alpha_mean"] == pytest.approx(0.2)
    ratio = np.linalg.norm(upd) / np.linalg.norm(x)
    assert st["update_ratio"] == pytest.approx(ratio)
    # per-token norms or plain floats give the same ratio
    tok = mgt_op_stats(None, update=torch.from_numpy(np.linalg.norm(upd, axis=-1)),
                       residual=torch.from_numpy(np.linalg.norm(x, axis=-1)))
    assert tok["update_ratio"] == pytest.approx(ratio)
    assert mgt_op_stats(None, update=2.0, residual=4.0)["update_ratio"] == 0.5
    assert tok["beta_mean"] is None and tok["gate_mean"] is None and tok["alpha_mean"] is None


def test_token_shaped_beta_and_summarise_ops():
    caps = [{"block": 0, "kind": "attn", "beta": torch.full((2, 3, 1), -0.5), "alpha": 0.0},
            {"block": 0, "kind": "ffn", "beta": torch.full((2, 3, 1), 0.5), "gate": torch.full((2, 3, 4), 0.99)}]
    ops = summarise_mgt_ops(caps)
    assert [o["sublayer"] for o in ops] == [0, 1] and ops[1]["kind"] == "ffn"
    assert ops[0]["beta_frac_negative"] == 1.0 and ops[1]["beta_frac_negative"] == 0.0
    assert ops[1]["gate_saturation"] == 1.0 and ops[0]["gate_mean"] is None
    assert summarise_mgt_ops([]) == []
    rec = make_geometry_record(7, layer_geometry([torch.randn(1, 4, 4)]), ops)
    assert len(rec["beta_hist_edges"]) == 31
    assert json.loads(json.dumps(rec))["ops"][0]["beta_hist"][10] == 6  # -0.5 lands in bin [-0.5, -0.4)
    assert "beta_hist_edges" not in make_geometry_record(7, [], [])
