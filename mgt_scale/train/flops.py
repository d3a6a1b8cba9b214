# FLOP accounting for MFU: training FLOPs per token for every residual kind (6 x matmul parameters,
# plus attention scores, plus MGT's gate and beta projections, which are ordinary matmul parameters
# and so already inside the 6N term, MGT's low-rank down-projection twice with beta_input: ln; plus mHC's
# stream mixing matmuls), the parameter count of every kind,
# and the per-device peak FLOP/s (configured or detected).
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
        if m.proj_rank and m.beta_input == "ln" and cfg.residual == "mgt":
            per_op += m.proj_rank * d  # the shared down-projection runs twice: on X (gate), on LN(X) (beta)
        per_block += 2 * per_op
    elif cfg.residual == "mhc":  # phi: n*d -> 2n + n^2 (H_pre, H_post, H_res logits)
        n = cfg.mhc.num_streams
        per_block += 2 * n * d * (2 * n + n * n)
    elif cfg.residual == "ddl_delta":  # w_beta and w_v: d -> 1 each
        per_block += 2 * 2 * d
    return per_block


def stream_mix_macs(cfg: ModelConfig) -> int:
    """Multiply-adds per token of matmuls without parameters: mHC's H_pre x (n*d) and H_res x (n^2 d) per
    sublayer (batched matmuls; H_post^T F is an elementwise broadcast, like MGT's gate, and not counted)."""
    if cfg.residual != "mhc":
        return 0
    n, d = cfg.mhc.num_streams, cfg.d_model
    return cfg.num_layers * 2 * (n * d + n * n * d)


def residual_op_params(cfg: ModelConfig) -> int:
    """Parameters of one residual operator (sublayer) of `cfg.residual`."""
    d, kind = cfg.d_model, cfg.residual
    norm = 2 * d  # the sublayer's LayerNorm (pre-LN, post-LN and DeepNorm alike)
    if kind in ("mgt", "mhc_gate", "ddl"):
        m = cfg.mgt
        gate_rows = d if kind in ("mgt", "mhc_gate") else 0
        beta_rows = (d if m.beta_shape == "channel" else 1) if kind in ("mgt", "ddl") else 0
        rows = gate_rows + beta_rows
        proj = m.proj_rank * (d + rows) if m.proj_rank else rows * d
        gate_norm = 2 * d if gate_rows else 0
        beta_vectors = beta_rows + (1 if m.alpha_shape == "scalar" else d) if beta_rows else 0
        return norm + proj + gate_norm + beta_vectors
    if kind == "mhc":  # phi, a_pre/a_post/a_res, b_pre, b_post, b_res
        n = cfg.mhc.num_streams
        return norm + n * d * (2 * n + n * n) + 3 + 2 * n + n * n
    if kind == "ddl_delta":  # w_beta, w_v, b_beta, b_v
        return norm + 2 * d + 2
    return norm


def num_params(cfg: ModelConfig) -> int:
    """All parameters of the stack: embedding, blocks (attention, FFN, two residual operators), final norm,
    LM head unless tied."""
    d, L = cfg.d_model, cfg.num_layers
    block = 4 * d * d + 2 * d * cfg.d_ff + 2 * residual_op_params(cfg)
    return cfg.vocab_size * d + L * block + 2 * d + (0 if cfg.tie_embeddings else d * cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6 * (N_matmul + mHC's mixing MACs) + 12 * L * d * T_avg
    (causal attention QK^T and AV, counted at the full sequence length as in the PaLM/Megatron MFU
    convention)."""
    return 6.0 * (matmul_params(cfg) + stream_mix_macs(cfg)) + 12.0 * cfg.num_layers * cfg.d_model * seq_len


def block_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The share of `flops_per_token` one block does (what a pipeline stage pays per block)."""
    return 6.0 * (block_matmul_params(cfg) + stream_mix_macs(cfg) / cfg.num_layers) + 12.0 * cfg.d_model * seq_len


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
