# FLOP accounting for MFU: training FLOPs per token for every residual kind (6 x matmul parameters,
# plus attention scores, plus MGT's gate and beta projections, which are ordinary matmul parameters
# and so already inside the 6N term), and the per-device peak FLOP/s (configured or detected).
from __future__ import annotations

from mgt_scale.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (embedding lookup excluded, LM head included)."""
    return cfg.num_layers * block_matmul_params(cfg) + cfg.d_model * cfg.vocab_size


def block_matmul_params(cfg: ModelConfig) -> int:
    """Matmul parameters of one block (attention, FFN, and the residual operators' projections)."""
    d = cfg.d_model
    per_block = 3 * d * d + d * d + 2 * d * cfg.d_ff
    if cfg.residual in ("mgt", "mhc_gate", "ddl"):
        m = cfg.mgt
        rows = (d if cfg.residual in ("mgt", "mhc_gate") else 0) + \
               ((d if m.beta_shape == "channel" else 1) if cfg.residual in ("mgt", "ddl") else 0)
        per_op = m.proj_rank * (d + rows) if m.proj_rank else rows * d
        per_block += 2 * per_op
    return per_block


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6 * N_matmul + 12 * L * d * T_avg (causal attention
    QK^T and AV, counted at the full sequence length as in the PaLM/Megatron MFU convention)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.d_model * seq_len


def block_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The share of `flops_per_token` one block does (what a pipeline stage pays per block)."""
    return 6.0 * block_matmul_params(cfg) + 12.0 * cfg.d_model * seq_len


# dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(), the first match counting: the
# PCIe and NVL H100s are slower than the SXM one the plain "H100" entry stands for
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
             "L40S": 362e12}


def peak_flops_per_device(configured: float, precision: str = "bf16") -> float:
    """Configured value, else the dense bf16 peak of a known GPU for a bf16 run, else 0 (MFU not
    reported: an fp32 run's matmuls run at another peak, and an unknown GPU's is not guessed)."""
    if configured:
        return configured
    import torch
    if precision == "bf16" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16.items():
            if key in name:
                return value
    return 0.0
