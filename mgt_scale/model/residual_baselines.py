# The two published mechanisms that MGT's gate and erasure simplify, as residual operators of the same
# stack: DeepSeek's manifold-constrained hyper-connections (`mhc`, arXiv 2512.24880, on Hyper-Connections,
# arXiv 2409.19606) and Deep Delta Learning's delta operator (`ddl_delta`, arXiv 2601.00417). Pure torch.
# Each operator has the interface of residual.ResidualOp (forward(x, sublayer), init_weights(cfg, gen),
# stats_sink, packed 1-D `vectors`), so Block, the pipeline wrappers and the monitor take them unchanged.
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgt_scale.config import ModelConfig
from mgt_scale.model.layers import normal_from_cpu_
from mgt_scale.model.residual import ResidualOp

Sublayer = Callable[[torch.Tensor], torch.Tensor]


def num_streams(cfg: ModelConfig) -> int:
    """Residual streams carried between blocks: mhc.num_streams for `mhc`, else 1."""
    return cfg.mhc.num_streams if cfg.residual == "mhc" else 1


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, d] -> [B, T, n*d]: n copies of the embedding (HC's expansion), stream-major."""
    return x if n == 1 else x.repeat(*([1] * (x.dim() - 1)), n)


def reduce_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, n*d] -> [B, T, d]: the sum of the streams (HC's reduction), before the final norm."""
    return x if n == 1 else x.reshape(*x.shape[:-1], n, x.shape[-1] // n).sum(dim=-2)


def sinkhorn_knopp(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp on exp(logits) over the last two dims [..., n, n]: alternately normalise the columns,
    then the rows, to sum to 1, `num_iters` times (M <- T_r(T_c(M))). The result is non-negative with rows
    summing to 1 exactly (to rounding) and columns to within the iteration's residual. exp is taken after
    subtracting each matrix's maximum (the result does not change: the normalisation removes any scale).
    The iterations run on an [n, n, tokens] copy, so that every sum and scaling is a contiguous vector op
    over the tokens (half the time, forward and backward, of broadcasting over trailing dims of size n)."""
    n = logits.shape[-1]
    z = logits.reshape(-1, n, n)
    m = torch.exp(z - z.amax(dim=(-2, -1), keepdim=True)).permute(1, 2, 0).contiguous()  # [n, n, N]
    for _ in range(num_iters):
        m = m * m.sum(dim=0, keepdim=True).reciprocal()  # columns
        m = m * m.sum(dim=1, keepdim=True).reciprocal()  # rows
    return m.permute(2, 0, 1).contiguous().view(logits.shape)


def delta_update(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """DDL's delta rule with value dimension 1: x + beta k (v - k^T x), i.e. (I - beta k k^T) x + beta k v.
    x, k: [..., d] (k of unit length); v, beta: [..., 1]. beta 0: identity; 1: k^T x_next = v (projection
    onto k-perp, then v written along k); 2 with v = 0: the Householder reflection of x across k-perp."""
    proj = (k * x).sum(dim=-1, keepdim=True)
    return x + (beta * (v - proj)) * k


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p) - math.log1p(-p)


class _PackedOp(nn.Module):
    """The packing of residual.ResidualOp: every small vector of the operator in one 1-D parameter
    `vectors` (ZeRO-3 pays Python work per parameter tensor), read through named views."""

    def _pack(self, layout: list[tuple[str, int]]) -> None:
        self.vector_names = tuple(name for name, _ in layout)
        self.vector_sizes = tuple(size for _, size in layout)
        self.vectors = nn.Parameter(torch.empty(sum(self.vector_sizes)))
        self.stats_sink: Optional[Callable[[nn.Module, dict], None]] = None

    def _views(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.vector_names, torch.split(self.vectors, self.vector_sizes)))

    def vector(self, name: str) -> torch.Tensor:
        return self._views()[name]


class MHCResidual(_PackedOp):
    """mHC, one sublayer: x_{l+1} = H_res x_l + H_post^T F(LN(H_pre x_l)), with x_l in R^{n x d} per token.

    The stream between blocks is [B, T, n*d] (stream-major; a 3-D tensor, so pipeline stages, activation
    checkpointing and the monitor's hooks handle it as any other stream). Per token, with
    r = RMS(vec(x_l)) over all n*d entries:
        z = (x_l phi) / r                       (phi: [n*d, 2n + n^2], one matmul for the three maps)
        H_pre  = sigmoid(a_pre z_pre + b_pre)                      [1 x n]
        H_post = 2 sigmoid(a_post z_post + b_post)                 [1 x n]
        H_res  = SinkhornKnopp(exp(a_res mat(z_res) + b_res))      [n x n], doubly stochastic
    Choices where the papers leave one open (each is ours):
    - F is the harness's sublayer behind its own LayerNorm (as the paper's F holds the block's norm), so
      n = 1 with H_pre = H_post = H_res = 1 is exactly pre-LN (tests/unit/test_residual_baselines.py).
    - RMSNorm without a gain, the division applied after the matmul (the paper's kernel order; a gain would
      only rescale phi's rows). Coefficients in fp32; the mixing runs in the stream's dtype.
    - init: phi ~ N(0, 1/(n d)) so that z has unit scale, a_* = mhc.coef_scale_init (0.01, the appendix);
      b_pre = +g on stream (sublayer index mod n), -g elsewhere (HC's cycling one-hot, softened by the
      sigmoid), b_post = 0 (H_post = 1, HC's B = 1), b_res = 0 on the diagonal and -g off it (H_res leaning
      to the identity, HC's A_r = I); g = mhc.init_logit_gap = 2 (H_pre 0.88 / 0.12, H_res diagonal 0.71 at
      n = 4). A larger g is closer to HC's one-hot and identity but slows Sinkhorn: at g = 4, 20 iterations
      leave H_res's column sums 1.4e-4 from 1 at init, at g = 2 1e-10. The streams start as copies, so
      the mixing changes nothing until they differ.
    - expansion: n copies of the embedding; reduction: the sum of the streams before the final norm (HC).
    - Sinkhorn: exp, then 20 rounds of column then row normalisation (T_r(T_c(M))), plain autograd (the
      paper's fused kernel recomputes it in the backward; here activation checkpointing does that).
    The probe statistics (stats_sink) hand over H_pre, H_post and H_res.
    """

    def __init__(self, cfg: ModelConfig, sublayer_index: int = 0):
        super().__init__()
        self.kind = "mhc"
        d, n = cfg.d_model, cfg.mhc.num_streams
        self.d, self.n, self.iters, self.norm_eps = d, n, cfg.mhc.sinkhorn_iters, cfg.norm_eps
        self.sublayer_index = sublayer_index
        self.phi = nn.Parameter(torch.empty(2 * n + n * n, n * d))
        self._pack([("norm_weight", d), ("norm_bias", d), ("scales", 3), ("pre_bias", n), ("post_bias", n),
                    ("res_bias", n * n)])

    def coefficients(self, x: torch.Tensor, v: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre [B, T, n], H_post [B, T, n], H_res [B, T, n, n]) in fp32 for the stream x [B, T, n*d]."""
        n = self.n
        inv_rms = torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.norm_eps)
        z = F.linear(x, self.phi).float() * inv_rms
        z_pre, z_post, z_res = torch.split(z, (n, n, n * n), dim=-1)
        a = v["scales"].float()
        h_pre = torch.sigmoid(a[0] * z_pre + v["pre_bias"].float())
        h_post = 2.0 * torch.sigmoid(a[1] * z_post + v["post_bias"].float())
        res_logits = a[2] * z_res + v["res_bias"].float()
        h_res = sinkhorn_knopp(res_logits.view(*z.shape[:-1], n, n), self.iters)
        return h_pre, h_post, h_res

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        v = self._views()
        h_pre, h_post, h_res = self.coefficients(x, v)
        return self.mix(x, sublayer, h_pre, h_post, h_res, v)

    def mix(self, x: torch.Tensor, sublayer: Sublayer, h_pre: torch.Tensor, h_post: torch.Tensor,
            h_res: torch.Tensor, v: Optional[dict] = None) -> torch.Tensor:
        """H_res x + H_post^T F(LN(H_pre x)) for given coefficients (x: [B, T, n*d])."""
        v = self._views() if v is None else v
        B, T = x.shape[:2]
        xs = x.reshape(B, T, self.n, self.d)
        dt = x.dtype
        x_in = torch.matmul(h_pre.to(dt).unsqueeze(-2), xs).squeeze(-2)  # [B, T, d]
        f = sublayer(F.layer_norm(x_in, (self.d,), v["norm_weight"], v["norm_bias"], self.norm_eps))
        out = torch.matmul(h_res.to(dt), xs) + h_post.to(dt).unsqueeze(-1) * f.unsqueeze(-2)
        out = out.reshape(B, T, self.n * self.d)
        if self.stats_sink is not None:
            with torch.no_grad():
                self.stats_sink(self, {"x": x.detach(), "update": (out - x).detach(), "h_pre": h_pre.detach(),
                                       "h_post": h_post.detach(), "h_res": h_res.detach()})
        return out

    @torch.no_grad()
    def init_weights(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        n, g = self.n, cfg.mhc.init_logit_gap
        normal_from_cpu_(self.phi, (n * self.d) ** -0.5, gen)
        one_hot = torch.zeros(n)
        one_hot[self.sublayer_index % n] = 1.0
        fill = {"norm_weight": torch.ones(self.d), "norm_bias": torch.zeros(self.d),
                "scales": torch.full((3,), cfg.mhc.coef_scale_init),
                "pre_bias": g * (2.0 * one_hot - 1.0), "post_bias": torch.zeros(n),
                "res_bias": -g * (1.0 - torch.eye(n)).reshape(-1)}
        for name, part in self._views().items():
            part.copy_(fill[name].to(part))


class DeltaResidual(_PackedOp):
    """DDL's delta operator (value dimension 1), one sublayer: X + beta k (v - k^T X).

    With c = LN(X) (the harness's LayerNorm where DDL uses RMSNorm):
        k    = F(c) / sqrt(||F(c)||^2 + k_eps^2)          (unit direction from the sublayer output)
        beta = 2 sigmoid(w_beta^T c + b_beta)              (fp32, one per token, in (0, 2))
        v    = value_scale sigmoid(w_v^T X + b_v)          (ddl_delta.value: stream, the authors' code)
             | w_v^T c + b_v                               (value: norm, the paper's projection of c)
             | w_v^T F(c) + b_v                            (value: sublayer)
    init (ours where not stated): w_beta, w_v ~ N(0, init_std); b_beta = logit(beta_init / 2) (beta_init 1,
    the authors' default); b_v = 0. w_beta and w_v are the rows of one matrix `beta_value` [2, d].
    The probe statistics hand over beta, v and k^T X.
    """

    def __init__(self, cfg: ModelConfig, sublayer_index: int = 0):
        super().__init__()
        self.kind = "ddl_delta"
        c = cfg.ddl_delta
        self.d, self.norm_eps = cfg.d_model, cfg.norm_eps
        self.value_mode, self.value_scale, self.k_eps = c.value, c.value_scale, c.k_eps
        self.beta_value = nn.Parameter(torch.empty(2, cfg.d_model))
        self._pack([("norm_weight", cfg.d_model), ("norm_bias", cfg.d_model), ("beta_bias", 1), ("value_bias", 1)])

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        v = self._views()
        c = F.layer_norm(x, (self.d,), v["norm_weight"], v["norm_bias"], self.norm_eps)
        f = sublayer(c)
        k = f * torch.rsqrt(f.float().pow(2).sum(dim=-1, keepdim=True) + self.k_eps ** 2).to(f.dtype)
        w = self.beta_value
        if self.value_mode == "norm":  # both read c: one matmul
            z_beta, z_val = torch.split(F.linear(c, w), 1, dim=-1)
        else:
            z_beta = F.linear(c, w[:1])
            z_val = F.linear(x if self.value_mode == "stream" else f, w[1:])
        beta = 2.0 * torch.sigmoid(z_beta.float() + v["beta_bias"].float())
        val = z_val.float() + v["value_bias"].float()
        if self.value_mode == "stream":
            val = self.value_scale * torch.sigmoid(val)
        proj = (k * x).sum(dim=-1, keepdim=True, dtype=torch.float32)
        out = x + (beta * (val - proj)).to(x.dtype) * k
        if self.stats_sink is not None:
            with torch.no_grad():
                self.stats_sink(self, {"x": x.detach(), "update": (out - x).detach(), "beta": beta.detach(),
                                       "delta_value": val.detach(), "delta_proj": proj.detach()})
        return out

    @torch.no_grad()
    def init_weights(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        normal_from_cpu_(self.beta_value, cfg.init_std, gen)
        fill = {"norm_weight": 1.0, "norm_bias": 0.0, "beta_bias": _logit(cfg.ddl_delta.beta_init / 2.0),
                "value_bias": 0.0}
        for name, part in self._views().items():
            part.fill_(fill[name])


def make_residual_op(cfg: ModelConfig, sublayer_index: int) -> nn.Module:
    """The residual operator of `cfg.residual` for sublayer `sublayer_index` (2 * block + 0 attn / 1 ffn)."""
    if cfg.residual == "mhc":
        return MHCResidual(cfg, sublayer_index)
    if cfg.residual == "ddl_delta":
        return DeltaResidual(cfg, sublayer_index)
    return ResidualOp(cfg)
