# Residual operators: how one sublayer (attention or FFN) updates the residual stream X.
# The MGT family (`mgt`, `mhc_gate`, `ddl`, arXiv 2601.01014) and the baselines (`preln`, `postln`,
# `deepnorm`). Pure torch. Each operator is a module holding its own norms and MGT parameters, and
# calls the sublayer function it is given, so blocks stay identical whatever the residual kind.
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgt_scale.config import ModelConfig

Sublayer = Callable[[torch.Tensor], torch.Tensor]


def deepnorm_constants(num_layers: int) -> tuple[float, float]:
    """DeepNet (Wang et al. 2022), decoder-only: residual scale a = (2N)^(1/4), init gain b = (8N)^(-1/4),
    N = number of layers (blocks)."""
    return (2.0 * num_layers) ** 0.25, (8.0 * num_layers) ** -0.25


def mgt_update(x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The DDL update X + beta * (V - alpha * X); beta < 0 is allowed (erasure of V's direction)."""
    return x + beta * (v - alpha * x)


def mgt_beta(z: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """beta = lam * tanh(z) + eps, with z = X @ W_beta + b_beta."""
    return lam * torch.tanh(z) + eps


class ResidualOp(nn.Module):
    """One sublayer's residual update, selected by `model.residual`.

    - preln:    X + F(LN(X))
    - postln:   LN(X + F(X))
    - deepnorm: LN(a * X + F(X)), a = (2N)^(1/4)
    - mhc_gate: X + V,                               V = F(LN(X)) * sigmoid(LN_g(X @ W_gate))
    - ddl:      X + beta * (F(LN(X)) - alpha * X),   beta = lam * tanh(X @ W_beta + b_beta) + eps
    - mgt:      X + beta * (V - alpha * X)

    Gate and beta projections read the raw stream X (not LN(X)), as the paper writes them. Their weights
    live in one matrix `gate_beta` (rows [0, d) for the gate, the rest for beta) so the fused path is a
    single matmul; with `mgt.proj_rank = r > 0` it is factored as up(r -> rows) @ down(d -> r).

    If `stats_sink` is set (by the monitor, from outside), the operator hands it detached intermediate
    tensors after each forward; otherwise it records nothing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.residual
        d = cfg.d_model
        m = cfg.mgt
        self.lam, self.eps = m.lam, m.eps
        self.fused = m.fused_proj
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.use_gate = self.kind in ("mgt", "mhc_gate")
        self.use_beta = self.kind in ("mgt", "ddl")
        self.gate_rows = d if self.use_gate else 0
        self.beta_rows = (d if m.beta_shape == "channel" else 1) if self.use_beta else 0
        rows = self.gate_rows + self.beta_rows
        self.proj_rank = m.proj_rank
        if rows:
            if m.proj_rank:
                self.gate_beta_down = nn.Parameter(torch.empty(m.proj_rank, d))
                self.gate_beta_up = nn.Parameter(torch.empty(rows, m.proj_rank))
            else:
                self.gate_beta = nn.Parameter(torch.empty(rows, d))
        if self.use_gate:
            self.gate_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        if self.use_beta:
            self.beta_bias = nn.Parameter(torch.empty(self.beta_rows))
            self.alpha = nn.Parameter(torch.empty(1 if m.alpha_shape == "scalar" else d))
        self.deepnorm_alpha = deepnorm_constants(cfg.num_layers)[0] if self.kind == "deepnorm" else 1.0
        self.stats_sink: Optional[Callable[["ResidualOp", dict], None]] = None

    # ------------------------------------------------------------------------------------------
    def _projections(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Raw gate pre-activation X @ W_gate and beta pre-activation X @ W_beta (no bias)."""
        if self.proj_rank or self.fused:
            z = (F.linear(F.linear(x, self.gate_beta_down), self.gate_beta_up) if self.proj_rank
                 else F.linear(x, self.gate_beta))
            if not (self.use_gate and self.use_beta):
                return (z, None) if self.use_gate else (None, z)
            # split, not two slices: the backward of a split is one concatenation, that of each slice
            # a zero-filled full-size buffer plus a copy, and then their sum
            g, b = torch.split(z, (self.gate_rows, self.beta_rows), dim=-1)
            return g, b
        g = F.linear(x, self.gate_beta[: self.gate_rows]) if self.use_gate else None
        b = F.linear(x, self.gate_beta[self.gate_rows:]) if self.use_beta else None
        return g, b

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        kind = self.kind
        if kind == "preln":
            return x + sublayer(self.norm(x))
        if kind == "postln":
            return self.norm(x + sublayer(x))
        if kind == "deepnorm":
            return self.norm(self.deepnorm_alpha * x + sublayer(x))
        f = sublayer(self.norm(x))
        g_pre, b_pre = self._projections(x)
        gate = beta = None
        v = f
        if self.use_gate:
            gate = torch.sigmoid(self.gate_norm(g_pre))
            v = f * gate
        if self.use_beta:
            beta = mgt_beta(b_pre + self.beta_bias, self.lam, self.eps)
            out = mgt_update(x, v, beta, self.alpha)
        else:
            out = x + v
        if self.stats_sink is not None:
            with torch.no_grad():
                self.stats_sink(self, {
                    "x": x.detach(), "update": (out - x).detach(),
                    "beta": None if beta is None else beta.detach(),
                    "gate": None if gate is None else gate.detach(),
                    "alpha": self.alpha.detach() if self.use_beta else None,
                })
        return out

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        """LN weight 1 / bias 0; gate rows of W ~ N(0, gate_init_std), beta rows ~ N(0, beta_init_std);
        low-rank factors: down ~ N(0, d^-1/2), up rows ~ N(0, std * r^-1/2 * d^1/2) so that the product has
        the same per-entry scale as the full form; b_beta = beta_bias_init; alpha = alpha_init."""
        m = cfg.mgt
        self.norm.reset_parameters()
        if self.use_gate:
            self.gate_norm.reset_parameters()
        rows = self.gate_rows + self.beta_rows
        if not rows:
            return
        stds = torch.cat([torch.full((self.gate_rows, 1), m.gate_init_std),
                          torch.full((self.beta_rows, 1), m.beta_init_std)])
        if self.proj_rank:
            d, r = cfg.d_model, self.proj_rank
            self.gate_beta_down.normal_(0.0, d ** -0.5, generator=gen)
            self.gate_beta_up.normal_(0.0, 1.0, generator=gen)
            self.gate_beta_up.mul_(stds.to(self.gate_beta_up) * math.sqrt(d / r))
        else:
            self.gate_beta.normal_(0.0, 1.0, generator=gen)
            self.gate_beta.mul_(stds.to(self.gate_beta))
        if self.use_beta:
            self.beta_bias.fill_(m.beta_bias_init)
            self.alpha.fill_(m.alpha_init)
