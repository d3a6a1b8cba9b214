# FLOP accounting (mgt_scale.train.flops) against an independent count: torch's FlopCounterMode over a
# real forward and backward of the model, for every residual kind and MGT form. The counter sees the
# matmuls the model actually runs, so a projection the formula forgets (or counts twice) shows up here.
# Also: the MFU formula of the metrics callback, and the peak FLOP/s lookup.
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from mgt_scale.config import DDLDeltaConfig, MGTConfig, MHCConfig, ModelConfig
from mgt_scale.model import build_model, count_parameters, lm_loss
from mgt_scale.train import flops
from mgt_scale.train.callbacks import MetricsCallback

B, T = 2, 16
FORMS = [("preln", {}), ("postln", {}), ("deepnorm", {}), ("mgt", {}), ("mgt", {"fused": False}),
         ("mgt", {"beta_shape": "token"}), ("mgt", {"proj_rank": 4}), ("mgt", {"proj_rank": 4, "beta_shape": "token"}),
         ("mhc_gate", {}), ("mhc_gate", {"proj_rank": 4}), ("ddl", {}), ("ddl", {"beta_shape": "token"}),
         ("ddl", {"proj_rank": 4}), ("mhc", {}), ("mhc", {"num_streams": 1}), ("mhc", {"num_streams": 3}),
         ("ddl_delta", {}), ("ddl_delta", {"value": "norm"}), ("ddl_delta", {"value": "sublayer"}),
         # beta reading LN(X): with proj_rank, MGT's shared down-projection runs on X and on LN(X)
         ("mgt", {"beta_input": "ln"}), ("mgt", {"proj_rank": 4, "beta_input": "ln"}),
         ("mgt", {"proj_rank": 4, "beta_input": "ln", "beta_shape": "token"}),
         ("ddl", {"proj_rank": 4, "beta_input": "ln"})]


def _inplace_addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.mm_flop(a_shape, b_shape)  # torch's own formula for addmm, applied to addmm_


def counted_flops_per_token(cfg: ModelConfig) -> float:
    """FLOPs of one training forward + backward, counted by torch, per token.

    Two additions make the counter see every matmul: attention through SDPA's math backend (the counter
    has no formula for the CPU flash kernel and counts it as 0), and a formula for the in-place `addmm_`
    (the counter knows only `addmm`)."""
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flops})
    with sdpa_kernel(SDPBackend.MATH), counter:
        lm_loss(model(x), x).backward()
    return counter.get_total_flops() / (B * T)


def tiny(residual: str, tied: bool = False, **opts) -> ModelConfig:
    """opts go to the kind's own sub-config (mgt, mhc or ddl_delta)."""
    sub = {"mhc": ("mhc", MHCConfig), "ddl_delta": ("ddl_delta", DDLDeltaConfig)}.get(residual, ("mgt", MGTConfig))
    kw = {sub[0]: sub[1](**opts)}
    return ModelConfig(num_layers=3, d_model=32, num_heads=4, d_ff=64, vocab_size=50, max_seq_len=T,
                       residual=residual, tie_embeddings=tied, **kw)


@pytest.mark.parametrize("residual,mgt", FORMS, ids=[f"{r}-{'-'.join(f'{k}={v}' for k, v in m.items())}"
                                                      for r, m in FORMS])
def test_flops_per_token_matches_torch_count(residual, mgt):
    cfg = tiny(residual, **mgt)
    assert flops.flops_per_token(cfg, T) == counted_flops_per_token(cfg)


@pytest.mark.parametrize("residual,opts", FORMS + [("mgt", {"alpha_shape": "channel"})],
                         ids=[f"{r}-{'-'.join(f'{k}={v}' for k, v in m.items())}" for r, m in FORMS] + ["mgt-alpha"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_num_params_matches_the_built_model(residual, opts, tied):
    cfg = tiny(residual, tied=tied, **opts)
    assert flops.num_params(cfg) == count_parameters(build_model(cfg))


def test_mhc_and_delta_terms_by_hand():
    """mhc at n=4, d=32: phi is (n d) x (2n + n^2) per sublayer; the mixing adds n d (H_pre x) and n^2 d
    (H_res x) multiply-adds per sublayer; params add a_* (3), b_pre, b_post (n each), b_res (n^2).
    ddl_delta: w_beta and w_v (d each) per sublayer, plus b_beta and b_v."""
    d, L, V, ff, n = 32, 3, 50, 64, 4
    base = L * (4 * d * d + 2 * d * ff) + d * V
    mhc = tiny("mhc")
    assert flops.matmul_params(mhc) == base + L * 2 * (n * d) * (2 * n + n * n)
    assert flops.stream_mix_macs(mhc) == L * 2 * (n * d + n * n * d)
    assert flops.flops_per_token(mhc, T) == 6 * (flops.matmul_params(mhc) + flops.stream_mix_macs(mhc)) + 12 * L * d * T
    assert flops.residual_op_params(mhc) == 2 * d + n * d * (2 * n + n * n) + 3 + 2 * n + n * n
    delta = tiny("ddl_delta")
    assert flops.matmul_params(delta) == base + L * 2 * 2 * d
    assert flops.stream_mix_macs(delta) == 0
    assert flops.residual_op_params(delta) == 2 * d + 2 * d + 2


@pytest.mark.parametrize("residual", ["preln", "mgt"])
def test_flops_per_token_tied_embeddings(residual):
    """A tied head still runs its d x V matmul, so it stays in the count."""
    cfg = tiny(residual, tied=True)
    assert flops.flops_per_token(cfg, T) == counted_flops_per_token(cfg) == flops.flops_per_token(tiny(residual), T)


def test_flops_terms_by_hand():
    """The full-form MGT block at d=32, d_ff=64: 4 d^2 + 2 d d_ff attention/FFN weights plus, per sublayer,
    a d x d gate and a d x d beta projection; head d x V; attention 12 L d T (PaLM/Megatron convention)."""
    d, L, V, ff = 32, 3, 50, 64
    cfg = ModelConfig(num_layers=L, d_model=d, num_heads=4, d_ff=ff, vocab_size=V, max_seq_len=T)
    n = L * (4 * d * d + 2 * d * ff + 2 * 2 * d * d) + d * V
    assert flops.matmul_params(cfg) == n
    assert flops.flops_per_token(cfg, T) == 6 * n + 12 * L * d * T
    pre = ModelConfig(num_layers=L, d_model=d, num_heads=4, d_ff=ff, vocab_size=V, max_seq_len=T, residual="preln")
    assert flops.matmul_params(pre) == L * (4 * d * d + 2 * d * ff) + d * V


class _Logger:
    def __init__(self):
        self.records = []

    def log(self, record, step):
        self.records.append(dict(record))


class _Trainer:
    is_main, start_time, max_steps = True, 0.0, 10


@pytest.mark.parametrize("world_size", [1, 4])
def test_mfu_is_global_tokens_over_world_peak(world_size, capsys):
    """tokens_per_s in a record counts the global batch, so MFU divides by the peak of every device."""
    logger = _Logger()
    cb = MetricsCallback(logger, log_interval=1, flops_per_token=6e6, peak_flops=1e12, world_size=world_size)
    cb._log(_Trainer(), {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 50_000.0, "grad_norm": 1.0})
    assert logger.records[0]["mfu"] == pytest.approx(50_000 * 6e6 / (1e12 * world_size))
    assert f"mfu {100 * 0.3 / world_size:.1f}%" in capsys.readouterr().out


def test_no_mfu_without_a_peak():
    logger = _Logger()
    MetricsCallback(logger, 1, flops_per_token=6e6, peak_flops=0.0)._log(
        _Trainer(), {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 5.0, "grad_norm": 1.0})
    assert "mfu" not in logger.records[0]


def test_peak_flops_configured_wins_and_cpu_has_none(monkeypatch):
    assert flops.peak_flops_per_device(123e12) == 123e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert flops.peak_flops_per_device(0.0) == 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert flops.peak_flops_per_device(0.0) == 989e12
    assert flops.peak_flops_per_device(0.0, "fp32") == 0.0  # not the bf16 peak for an fp32 run
    assert flops.peak_flops_per_device(5e12, "fp32") == 5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert flops.peak_flops_per_device(0.0) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 NVL")
    assert flops.peak_flops_per_device(0.0) == 835e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Unknown Accelerator")
    assert flops.peak_flops_per_device(0.0) == 0.0


def test_ln_low_rank_second_down_projection_by_hand():
    """mgt, proj_rank r, beta_input ln: the down-projection (r x d) runs on X (gate) and on LN(X) (beta),
    2 d r more FLOPs per token and sublayer forward, 6 d r forward + backward."""
    d, r, L = 32, 4, 3
    x, ln = tiny("mgt", proj_rank=r), tiny("mgt", proj_rank=r, beta_input="ln")
    assert flops.flops_per_token(ln, T) - flops.flops_per_token(x, T) == 6 * L * 2 * d * r
    assert flops.num_params(ln) == flops.num_params(x)  # the same weights, used twice
