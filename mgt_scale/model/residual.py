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
from mgt_scale.model.layers import normal_from_cpu_

Sublayer = Callable[[torch.Tensor], torch.Tensor]

# state-dict key of each packed vector before they were packed into `ResidualOp.vectors`
LEGACY_VECTOR_KEYS = {"norm_weight": "norm.weight", "norm_bias": "norm.bias", "gate_norm_weight": "gate_norm.weight",
                      "gate_norm_bias": "gate_norm.bias", "beta_bias": "beta_bias", "alpha": "alpha"}


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


def _twice_affine(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 (h @ w^T + b) as one addmm kernel."""
    out = torch.addmm(b, h.reshape(-1, h.shape[-1]), w.t(), beta=2.0, alpha=2.0)
    return out.view(*h.shape[:-1], w.shape[0])


class ResidualOp(nn.Module):
    """One sublayer's residual update, selected by `model.residual`.

    - preln:    X + F(LN(X))
    - postln:   LN(X + F(X))
    - deepnorm: LN(a * X + F(X)), a = (2N)^(1/4)
    - mhc_gate: X + V,                               V = F(LN(X)) * sigmoid(LN_g(X @ W_gate))
    - ddl:      X + beta * (F(LN(X)) - alpha * X),   beta = lam * tanh(X @ W_beta + b_beta) + eps
    - mgt:      X + beta * (V - alpha * X)

    The operator's small vectors (LN weight and bias; with a gate, the gate LN's; with beta, b_beta and
    alpha) live in one 1-D parameter `vectors`, read through views (`norm_weight`, ..., `alpha`): part of
    DeepSpeed ZeRO-3's cost is Python work per parameter tensor and step (fetch, release, gradient hooks,
    re-partitioning, norm), and MGT's six vectors per operator were two thirds of its tensors. Packing
    took about a third off ZeRO-3's extra time at depth 24; most of what remains follows the parameter
    bytes, not the tensor count (bench/RESULTS.md).

    Gate and beta projections read the raw stream X (not LN(X)), as the paper writes them. Their weights
    live in one matrix `gate_beta` (rows [0, d) for the gate, the rest for beta) so the fused path is a
    single matmul; with `mgt.proj_rank = r > 0` it is factored as up(r -> rows) @ down(d -> r).
    `mgt.beta_input: ln` makes beta read the sublayer's normalised input instead, beta = lam tanh(LN(X)
    W_beta + b_beta) + eps (the gate still reads X): then the gate and beta rows are two matmuls (with
    `proj_rank`, the shared down-projection is applied to X for the gate and to LN(X) for beta).
    `mgt.fused` (default) picks `_fused_update`; `mgt.fused: false` picks `_reference_update`, the formulas
    above op by op, which the tests hold the fused path to (fp32, 1e-6). `parallel.compile: blocks` fuses
    the fused path's elementwise chain into a few kernels (mgt_scale/parallel/compile.py; it replaced a
    hand-written C++ CPU kernel, coming within about 5 % of it: bench/RESULTS.md section 6).

    If `stats_sink` is set (by the monitor, from outside), the operator hands it detached intermediate
    tensors after each forward; otherwise it records nothing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.residual
        d = cfg.d_model
        m = cfg.mgt
        self.lam, self.eps = m.lam, m.eps
        self.fused = m.fused
        # getattr: a Hugging Face export written before the option existed has no beta_input in config.json
        self.beta_reads_ln = getattr(m, "beta_input", "x") == "ln"
        self.norm_eps = cfg.norm_eps
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
        layout = [("norm_weight", d), ("norm_bias", d)]
        if self.use_gate:
            layout += [("gate_norm_weight", d), ("gate_norm_bias", d)]
        if self.use_beta:
            layout += [("beta_bias", self.beta_rows), ("alpha", 1 if m.alpha_shape == "scalar" else d)]
        self.vector_names = tuple(name for name, _ in layout)
        self.vector_sizes = tuple(n for _, n in layout)
        self.vectors = nn.Parameter(torch.empty(sum(self.vector_sizes)))
        self.deepnorm_alpha = deepnorm_constants(cfg.num_layers)[0] if self.kind == "deepnorm" else 1.0
        self.stats_sink: Optional[Callable[["ResidualOp", dict], None]] = None

    # ------------------------------------------------------------------------------------------
    def vector(self, name: str) -> torch.Tensor:
        """One of the packed vectors (a view of `vectors`, so gradients and in-place edits reach it)."""
        i = self.vector_names.index(name)
        start = sum(self.vector_sizes[:i])
        return self.vectors[start: start + self.vector_sizes[i]]

    def _views(self) -> dict[str, torch.Tensor]:
        """All packed vectors by name, from one split (one autograd node, whose backward is one concat)."""
        return dict(zip(self.vector_names, torch.split(self.vectors, self.vector_sizes)))

    norm_weight = property(lambda self: self.vector("norm_weight"))
    norm_bias = property(lambda self: self.vector("norm_bias"))
    gate_norm_weight = property(lambda self: self.vector("gate_norm_weight"))
    gate_norm_bias = property(lambda self: self.vector("gate_norm_bias"))
    beta_bias = property(lambda self: self.vector("beta_bias"))
    alpha = property(lambda self: self.vector("alpha"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """State dicts written before the vectors were packed (one key per vector: `norm.weight`, ...,
        `alpha`; exports and consolidated checkpoints of older versions) load too: their keys are packed
        into `vectors` here. (`load_state_dict` hands each module its own copy of the dict.)"""
        old = [prefix + LEGACY_VECTOR_KEYS[n] for n in self.vector_names]
        if prefix + "vectors" not in state_dict and all(k in state_dict for k in old):
            state_dict[prefix + "vectors"] = torch.cat([state_dict.pop(k).reshape(-1) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, self.norm_eps)

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        kind = self.kind
        v = self._views()
        if kind == "preln":
            return x + sublayer(self._norm(x, v["norm_weight"], v["norm_bias"]))
        if kind == "postln":
            return self._norm(x + sublayer(x), v["norm_weight"], v["norm_bias"])
        if kind == "deepnorm":
            return self._norm(self.deepnorm_alpha * x + sublayer(x), v["norm_weight"], v["norm_bias"])
        xn = self._norm(x, v["norm_weight"], v["norm_bias"])
        f = sublayer(xn)
        xb = xn if self.beta_reads_ln and self.use_beta else None  # what beta reads, when not X
        out, gate, beta = self._fused_update(x, f, v, xb) if self.fused else self._reference_update(x, f, v, xb)
        if self.stats_sink is not None:
            with torch.no_grad():
                self.stats_sink(self, {
                    "x": x.detach(), "update": (out - x).detach(),
                    "beta": None if beta is None else beta.detach(),
                    "gate": None if gate is None else gate.detach(),
                    "alpha": v["alpha"].detach() if self.use_beta else None,
                })
        return out

    def _gated(self, f: torch.Tensor, g_pre: Optional[torch.Tensor], v: dict):
        """(gate, V): gate = sigmoid(LN_g(X W_gate)) and V = F * gate, or (None, F) without a gate."""
        if g_pre is None:
            return None, f
        gate = torch.sigmoid(self._norm(g_pre, v["gate_norm_weight"], v["gate_norm_bias"]))
        return gate, f * gate

    def _reference_update(self, x: torch.Tensor, f: torch.Tensor, v: dict, xb: Optional[torch.Tensor] = None):
        """The paper's formulas op by op, with separate gate and beta matmuls: the reference that the
        fused path is tested against (`mgt.fused: false`). `xb`: what beta reads instead of X (LN(X))."""
        h, up = (F.linear(x, self.gate_beta_down), self.gate_beta_up) if self.proj_rank else (x, self.gate_beta)
        gate, val = self._gated(f, F.linear(h, up[: self.gate_rows]) if self.use_gate else None, v)
        if not self.use_beta:
            return x + val, gate, None
        if xb is not None:
            h = F.linear(xb, self.gate_beta_down) if self.proj_rank else xb
        beta = mgt_beta(F.linear(h, up[self.gate_rows:]) + v["beta_bias"], self.lam, self.eps)
        return mgt_update(x, val, beta, v["alpha"]), gate, beta

    def _fused_update(self, x: torch.Tensor, f: torch.Tensor, v: dict, xb: Optional[torch.Tensor] = None):
        """Same values as `_reference_update` (fp32 to rounding), fewer and cheaper kernels; each choice
        below was measured on CPU (bench/RESULTS.md):
        - projections: full form, one matmul for gate and beta rows, split (not sliced: a split's backward is
          one concatenation); low rank, one shared down-projection, then the gate and beta up-projections
          apart (a 129-wide output runs slower than a 128-wide one, and needs a split and a concatenation)
          with b_beta added inside the matmul (addmm);
        - beta = lam tanh(z) + eps = 2 lam sigmoid(2 z) + (eps - lam): sigmoid runs twice as fast as tanh
          here, and the affine part is one kernel (addcmul);
        - update X + beta (V - alpha X) as addcmul(X, beta, addcmul(V, alpha, X, -1)): two kernels instead
          of four; with one beta per token, X (1 - alpha beta) + beta V, where 1 - alpha beta is per token.
        `xb` (beta_input: ln): beta reads LN(X), so its rows are a matmul of their own.
        """
        gr = self.gate_rows
        # g_pre = X W_gate^T; z2 = 2 (X W_beta^T + b_beta), the factor 2 folded into a matmul or an add
        if xb is not None:
            if self.proj_rank:
                up, hb = self.gate_beta_up, F.linear(xb, self.gate_beta_down)
                h = F.linear(x, self.gate_beta_down) if self.use_gate else None  # ddl: no gate reads X
            else:
                up, h, hb = self.gate_beta, x, xb
            g_pre = F.linear(h, up[:gr]) if self.use_gate else None
            z2 = _twice_affine(hb, up[gr:], v["beta_bias"])
        elif self.proj_rank:
            h = F.linear(x, self.gate_beta_down)
            g_pre = F.linear(h, self.gate_beta_up[:gr]) if self.use_gate else None
            z2 = _twice_affine(h, self.gate_beta_up[gr:], v["beta_bias"]) if self.use_beta else None
        elif self.use_gate and self.use_beta:
            g_pre, b_pre = torch.split(F.linear(x, self.gate_beta), (gr, self.beta_rows), dim=-1)
            z2 = torch.add(2.0 * v["beta_bias"], b_pre, alpha=2.0)
        else:
            g_pre = F.linear(x, self.gate_beta) if self.use_gate else None
            z2 = _twice_affine(x, self.gate_beta, v["beta_bias"]) if self.use_beta else None
        gate, val = self._gated(f, g_pre, v)
        if not self.use_beta:
            return x + val, gate, None
        s = torch.sigmoid(z2)
        beta = torch.addcmul(s.new_full((), self.eps - self.lam), s, s.new_full((), 2.0 * self.lam))
        alpha = v["alpha"]
        if self.beta_rows == 1:
            keep = 1.0 - alpha * beta  # per token
            return torch.addcmul(x * keep, beta, val), gate, beta
        return torch.addcmul(x, beta, torch.addcmul(val, alpha, x, value=-1.0)), gate, beta

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        """LN weight 1 / bias 0; gate and beta rows of W ~ N(0, d^-1/2) with `mgt.proj_init: fan_in` (the
        default: X @ W then has the variance of the stream's entries, well above the gate LN's eps, so the
        gate varies at init), or gate rows ~ N(0, gate_init_std), beta rows ~ N(0, beta_init_std) with
        `proj_init: std`; low-rank factors: down ~ N(0, d^-1/2), up rows ~ N(0, std * r^-1/2 * d^1/2) so
        that the product has the same per-entry scale as the full form; b_beta = beta_bias_init; alpha =
        alpha_init. Measured spreads at init: MGTConfig's docstring and docs/RESULTS.md."""
        m = cfg.mgt
        fill = {"norm_weight": 1.0, "norm_bias": 0.0, "gate_norm_weight": 1.0, "gate_norm_bias": 0.0,
                "beta_bias": m.beta_bias_init, "alpha": m.alpha_init}
        for name, part in self._views().items():
            part.fill_(fill[name])
        rows = self.gate_rows + self.beta_rows
        if not rows:
            return
        fan_in = cfg.d_model ** -0.5
        gate_std, beta_std = (fan_in, fan_in) if m.proj_init == "fan_in" else (m.gate_init_std, m.beta_init_std)
        stds = torch.cat([torch.full((self.gate_rows, 1), gate_std), torch.full((self.beta_rows, 1), beta_std)])
        if self.proj_rank:
            d, r = cfg.d_model, self.proj_rank
            normal_from_cpu_(self.gate_beta_down, d ** -0.5, gen)
            normal_from_cpu_(self.gate_beta_up, 1.0, gen)
            self.gate_beta_up.mul_(stds.to(self.gate_beta_up) * math.sqrt(d / r))
        else:
            normal_from_cpu_(self.gate_beta, 1.0, gen)
            self.gate_beta.mul_(stds.to(self.gate_beta))
