# Raw rank, centred rank and centred energy (rho) per layer (issue #33, finding 1): the metrics against
# float64 numpy references, the centred rank undefined where the centred part is rounding noise, the
# float64 probe, and `mgt probe --json` carrying the three numbers per layer.
import json
import math

import numpy as np
import pytest
import torch

from mgt_scale.config import ModelConfig
from mgt_scale.model import build_model
from mgt_scale.monitor.metrics import (centred_energy_threshold, hidden_geometry, layer_geometry,
                                       per_sequence_geometry)
from mgt_scale.monitor.probe import capture_hidden_states, probe_geometry


def np_eff_rank_norm(a: np.ndarray) -> float:
    s = np.linalg.svd(a, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()) / min(a.shape))


def np_reference(x: np.ndarray) -> dict:
    """Batch mean of raw / centred normalised effective rank, batch minimum of rho, all float64."""
    raw, cen, rho = [], [], []
    for a in x:
        c = a - a.mean(axis=0, keepdims=True)
        raw.append(np_eff_rank_norm(a))
        cen.append(np_eff_rank_norm(c))
        rho.append(np.linalg.norm(c) / np.linalg.norm(a))
    return {"eff_rank_norm_raw": np.mean(raw), "eff_rank_norm_centred": np.mean(cen), "centred_energy": min(rho)}


def test_raw_centred_and_rho_match_numpy_float64():
    x = np.random.default_rng(0).standard_normal((3, 40, 24)) * 0.3 + np.linspace(-2, 3, 24)  # shared mean
    got = hidden_geometry(torch.from_numpy(x))
    want = np_reference(x)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    assert got["eff_rank_norm"] == got["eff_rank_norm_raw"]  # legacy key: raw by default
    assert hidden_geometry(torch.from_numpy(x), center=True)["eff_rank_norm"] == pytest.approx(want["eff_rank_norm_centred"], rel=1e-12)


def collapsed_stream(rho: float, dtype: torch.dtype) -> torch.Tensor:
    """Every token = one shared vector + a token-specific part of relative size rho (built in float64)."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 1, 64, generator=g, dtype=torch.float64) * 30
    noise = torch.randn(2, 48, 64, generator=g, dtype=torch.float64)
    noise -= noise.mean(dim=1, keepdim=True)
    noise *= rho * torch.linalg.vector_norm(v.expand(1, 48, 64)) / torch.linalg.vector_norm(noise[0])
    return (v + noise).to(dtype)


def test_centred_rank_is_undefined_below_the_dtype_threshold():
    # the token-specific part (rho 1e-8) is below fp32 resolution: in fp32 the "centred rank" would be
    # a spectrum of rounding errors (the old code reported it as a number); now it is NaN, rho is kept
    h32 = hidden_geometry(collapsed_stream(1e-8, torch.float32), center=True)
    assert math.isnan(h32["eff_rank_norm_centred"]) and math.isnan(h32["eff_rank_norm"])
    assert h32["centred_energy"] < 1e-6 and h32["eff_rank_norm_raw"] == pytest.approx(1 / 48, rel=1e-3)
    # the same stream held in float64 resolves it: defined, and equal to the numpy reference
    x64 = collapsed_stream(1e-8, torch.float64)
    h64 = hidden_geometry(x64)
    assert h64["centred_energy"] == pytest.approx(1e-8, rel=0.1)
    assert h64["eff_rank_norm_centred"] == pytest.approx(np_reference(x64.numpy())["eff_rank_norm_centred"], rel=1e-6)
    # above the threshold an fp32 stream is read, and agrees with float64 to well under 1e-2
    a = hidden_geometry(collapsed_stream(1e-3, torch.float32))["eff_rank_norm_centred"]
    b = hidden_geometry(collapsed_stream(1e-3, torch.float64))["eff_rank_norm_centred"]
    assert abs(a - b) < 1e-2
    # an explicit threshold wins over the dtype's
    assert math.isnan(hidden_geometry(x64, min_centred_energy=1e-4)["eff_rank_norm_centred"])


def test_thresholds_and_batch_minimum():
    assert centred_energy_threshold(torch.float32) == pytest.approx(1000 * 1.1920929e-07)
    assert centred_energy_threshold(torch.float64) == pytest.approx(1000 * 2.220446e-16)
    assert centred_energy_threshold(torch.bfloat16) == 1.0
    x = torch.cat([collapsed_stream(1e-2, torch.float64), collapsed_stream(1e-6, torch.float64)])
    per = per_sequence_geometry(x, min_centred_energy=1e-4)
    assert torch.isnan(per["eff_rank_norm_centred"][2:]).all() and torch.isfinite(per["eff_rank_norm_centred"][:2]).all()
    h = hidden_geometry(x, min_centred_energy=1e-4)
    assert h["centred_energy"] == pytest.approx(1e-6, rel=0.1)  # the minimum over the batch
    assert math.isnan(h["eff_rank_norm_centred"])  # undefined if any sequence is


def test_layer_geometry_reads_each_layers_dtype():
    hs = [collapsed_stream(1e-6, torch.float64), collapsed_stream(1e-6, torch.float64).float()]
    layers = layer_geometry(hs)
    assert math.isfinite(layers[0]["eff_rank_norm_centred"]) and math.isnan(layers[1]["eff_rank_norm_centred"])


def tiny(residual="postln", layers=3):
    cfg = ModelConfig(num_layers=layers, d_model=32, num_heads=2, d_ff=64, vocab_size=50, max_seq_len=16,
                      residual=residual)
    return build_model(cfg, seed=1)


def test_float64_probe_is_the_float64_forward_and_leaves_the_model_alone():
    model = tiny("mgt")
    toks = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = probe_geometry(model, toks, step=3, float64=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        want = layer_geometry(capture_hidden_states(model.double(), toks),
                              min_centred_energy=centred_energy_threshold(torch.float32))
    for got, w in zip(rec["layers"], want):
        for k in ("eff_rank_norm_raw", "eff_rank_norm_centred", "centred_energy"):
            assert got[k] == pytest.approx(w[k], rel=1e-12)
    assert rec["step"] == 3 and len(rec["ops"]) == 6


def test_mgt_probe_json_has_raw_centred_and_rho_per_layer(tmp_path):
    from mgt_scale.commands.probe import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {num_layers: 2, d_model: 32, num_heads: 2, d_ff: 64, vocab_size: 50, max_seq_len: 32}\n"
                   "data: {synthetic: random, seq_len: 32}\nmonitor: {probe_batch_size: 2, probe_seq_len: 24}\n")
    out = tmp_path / "p.json"
    assert main(["--config", str(cfg), "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["layers"]
    assert len(layers) == 3
    for l in layers:
        assert 0 < l["eff_rank_norm_raw"] <= 1 and 0 < l["eff_rank_norm_centred"] <= 1 and 0 < l["centred_energy"] <= 1


def test_centred_rank_script_reads_mhc_as_the_sum_of_its_streams(tmp_path):
    """scripts/centred_rank.py: an mhc model's [tokens, n*d] state is normalised by min(tokens, n*d), so its
    summary reads the sum of the n streams (width d, comparable with the other kinds); the widened state's
    reading is kept under "streams". Both against the numpy float64 reference."""
    import importlib.util
    from pathlib import Path
    from mgt_scale.config import load_config
    from mgt_scale.train.monitor_callback import probe_tokens
    spec = importlib.util.spec_from_file_location(
        "centred_rank", Path(__file__).resolve().parents[2] / "scripts" / "centred_rank.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "c.yaml"
    path.write_text("model: {num_layers: 3, d_model: 16, num_heads: 2, d_ff: 32, vocab_size: 50, max_seq_len: 32,"
                    " residual: mhc, init_std: 0.2}\n"  # large embeddings: the streams keep token-specific rank
                    "data: {synthetic: random, seq_len: 32}\nmonitor: {probe_batch_size: 2, probe_seq_len: 24}\n")
    cfg = load_config(path)
    model = build_model(cfg.model, seed=0)
    out = script.probe_both(cfg, model)
    with torch.no_grad():
        last = capture_hidden_states(model.double(), probe_tokens(cfg, 50))[-1].numpy()  # [2, 24, 4 * 16]
    summed = last.reshape(2, 24, 4, 16).sum(axis=2)
    assert out["raw"]["last"] == pytest.approx(np_reference(summed)["eff_rank_norm_raw"], rel=1e-9)
    assert out["rho_last"] == pytest.approx(np_reference(summed)["centred_energy"], rel=1e-9)
    assert out["streams"]["raw"]["last"] == pytest.approx(np_reference(last)["eff_rank_norm_raw"], rel=1e-9)
    assert abs(out["raw"]["last"] - out["streams"]["raw"]["last"]) > 0.05  # the two normalisations differ
