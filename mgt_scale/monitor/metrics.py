# Geometry metrics of the residual stream (effective rank, stable rank, token cosine similarity,
# distance from rank 1, token norm) and summary statistics of the MGT residual operators (beta,
# gate, alpha, update size). Everything is computed in float64 from detached tensors; the functions
# are pure (no hooks, no logging) so that they can be tested against numpy/scipy references.
"""Residual-stream geometry and MGT operator statistics.

Conventions (read these before comparing numbers with a paper):

* Input: the hidden states of one layer, ``[batch, tokens, width]``. Every metric is computed
  per sequence on the ``tokens x width`` matrix ``A`` and then averaged over the batch.
* **No mean-centring by default.** The SVD-based metrics (effective rank, stable rank, distance
  from rank 1) are computed on the raw matrix ``A``. This is what the rank-collapse literature
  plots for effective rank (Roy & Vetterli 2007 applied to token matrices) and it keeps a
  "all tokens equal" state at rank 1 instead of turning it into a zero matrix whose spectrum is
  rounding noise. ``center=True`` subtracts each sequence's mean token first (for the three SVD
  metrics only; cosine similarity and token norm are always on the raw tokens).
* **Raw and centred, side by side.** Every layer also carries ``eff_rank_norm_raw``,
  ``eff_rank_norm_centred`` and the centred energy ``centred_energy`` = rho = ||A - 1 mean^T||_F /
  ||A||_F (the batch minimum). Where the stream has collapsed onto one token (rho ~ 1e-7 relative) the
  centred matrix is the forward pass's rounding error, and its "rank" says nothing about the model
  (a post-LN stack read 0.60 from an fp32 forward and 0.02 from an fp64 one). The centred metrics are
  therefore NaN (undefined; ``null`` in JSON) where rho is below :func:`centred_energy_threshold` of
  the dtype the forward pass ran in. Final numbers come from a float64 forward pass
  (``mgt_scale.monitor.probe.probe_geometry(..., float64=True)``).
* ``rank1_residual`` is ``sqrt(sum_{i>1} s_i^2) / ||A||_F``: the relative Frobenius distance to
  the *best* rank-1 approximation (Eckart-Young), uncentred. Dong et al. 2021 ("Attention is not
  all you need") measure the distance to the nearest matrix of the special rank-1 form
  ``1 x^T`` (all tokens identical), which equals the norm of the mean-centred matrix. Ours is
  always <= theirs (``1 x^T`` is one rank-1 matrix) and both go to 0 under token collapse; ours
  also goes to 0 when tokens collapse onto one *direction* with different lengths.
* Effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` and
  ``0 log 0 = 0``. ``eff_rank_norm`` divides by ``min(tokens, width)``, so it lies in ``(0, 1]``.
* Degenerate inputs: an all-zero matrix gives eff_rank = stable_rank = rank1_residual = 0 (it
  trips a collapse alarm, which is what we want); zero-norm tokens count as cosine 0 with every
  other token; a sequence of one token has cosine NaN; a sequence that contains NaN/Inf gives NaN
  for every metric (the SVD is not attempted on it), so the batch average is NaN as well.

Layer indexing in :func:`layer_geometry`: ``hiddens[i]`` for ``i < num_blocks`` is the input of
block ``i`` (``hiddens[0]`` is the embedding output) and ``hiddens[num_blocks]`` is the output of the
last block (before any final norm). Layer dicts carry ``layer = i``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Fixed beta histogram bins: beta = lam * tanh(.) + eps lies in (eps - lam, eps + lam); the bins
# cover [-1.5, 1.5] (the defaults lam=1, eps=0 with margin). Values outside are counted in the edge
# bins so that the counts always sum to the number of finite beta entries.
BETA_HIST_EDGES: np.ndarray = np.linspace(-1.5, 1.5, 31)
GATE_SATURATION_LOW = 0.05
GATE_SATURATION_HIGH = 0.95

LAYER_KEYS = ("layer", "eff_rank", "eff_rank_norm", "stable_rank", "cosine", "rank1_residual", "norm",
              "eff_rank_norm_raw", "eff_rank_norm_centred", "centred_energy")
MIN_OVER_BATCH = ("centred_energy",)  # reduced over the batch by its minimum (the others: mean)
CENTRED_ENERGY_ULPS = 1000.0  # centred metrics need rho >= this many eps of the forward dtype
OP_KEYS = ("beta_mean", "beta_std", "beta_frac_negative", "beta_hist", "gate_mean", "gate_saturation",
           "alpha_mean", "update_ratio")

# float64 elements stacked into one batched SVD call (512 MiB); more layers are done in chunks
DEFAULT_MAX_ELEMENTS = 1 << 26


def _spectral(s: Tensor, t: int, d: int) -> dict[str, Tensor]:
    """eff_rank, eff_rank_norm, stable_rank, rank1_residual from singular values ``s: [N, min(t, d)]``."""
    s_sum = s.sum(dim=-1)
    ok = s_sum > 0
    safe_sum = torch.where(ok, s_sum, torch.ones_like(s_sum))
    p = s / safe_sum.unsqueeze(-1)
    entropy = -torch.xlogy(p, p).sum(dim=-1)
    zero = torch.zeros_like(s_sum)
    eff_rank = torch.where(ok, torch.exp(entropy), zero)
    s2 = s.pow(2)
    fro2 = s2.sum(dim=-1)
    s1_sq = torch.where(ok, s2[:, 0], torch.ones_like(s_sum))
    stable_rank = torch.where(ok, fro2 / s1_sq, zero)
    tail = s2[:, 1:].sum(dim=-1)
    rank1_residual = torch.where(ok, torch.sqrt(tail / torch.where(ok, fro2, torch.ones_like(fro2))), zero)
    return {"eff_rank": eff_rank, "eff_rank_norm": eff_rank / min(t, d), "stable_rank": stable_rank,
            "rank1_residual": rank1_residual}


def centred_energy_threshold(dtype: torch.dtype) -> float:
    """Smallest centred energy rho = ||A - mean||_F / ||A||_F at which the centred rank of hidden states
    computed in ``dtype`` is read; below it the centred part is (or may be) rounding noise of the forward
    pass and the centred metrics are undefined (NaN).

    ``CENTRED_ENERGY_ULPS`` machine epsilons of the forward dtype: fp32 1.2e-4, fp64 2.2e-13, bf16 1.0
    (never defined: bf16 states cannot resolve a centred part). Why 1000 ulps: the stream's rounding
    error grows with width and depth, about eps * sqrt(d) * L (64 blocks of width 64: ~1e-4 relative in
    fp32), and the measurement in docs/RESULTS.md ("The metric") found fp32 centred ranks off by up to
    0.6 where the fp64 rho was 7e-8 and within 0.01 of the fp64 value from rho ~ 1e-4 up."""
    if not dtype.is_floating_point:
        return 0.0
    return min(1.0, CENTRED_ENERGY_ULPS * torch.finfo(dtype).eps)


def per_sequence_geometry(x: Tensor, center: bool = False, min_centred_energy: float | None = None) -> dict[str, Tensor]:
    """All metrics for a stack of matrices ``x: [N, tokens, width]``, one value per matrix.

    Returns float64 tensors of shape ``[N]`` keyed eff_rank, eff_rank_norm, stable_rank, cosine,
    rank1_residual, norm (SVD metrics raw, or mean-centred with ``center``), eff_rank_norm_raw,
    eff_rank_norm_centred and centred_energy (rho = ||A - mean token||_F / ||A||_F). Where rho <
    ``min_centred_energy`` (default: :func:`centred_energy_threshold` of ``x``'s dtype, so pass the
    dtype the forward pass ran in) the centred metrics are NaN: the centred part is rounding noise
    there. One batched ``torch.linalg.svdvals`` call does the raw and the centred matrices.
    """
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"expected [N, tokens, width], got shape {tuple(x.shape)}")
    if min_centred_energy is None:
        min_centred_energy = centred_energy_threshold(x.dtype)
    x = x.detach().to(torch.float64)
    n, t, d = x.shape
    finite = torch.isfinite(x).all(dim=(1, 2))
    all_finite = bool(finite.all())
    if not all_finite:
        x = torch.where(finite[:, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))

    # token norms and cosine similarity: always on the raw tokens
    norms = torch.linalg.vector_norm(x, dim=-1)  # [N, T]
    mean_norm = norms.mean(dim=-1)
    nonzero = norms > 0
    u = x / torch.where(nonzero, norms, torch.ones_like(norms)).unsqueeze(-1)  # zero rows stay zero
    # sum_{s != t} <u_s, u_t> = ||sum_t u_t||^2 - sum_t ||u_t||^2
    total = torch.linalg.vector_norm(u.sum(dim=1), dim=-1).pow(2)
    diag = nonzero.sum(dim=-1).to(x.dtype)
    cosine = (total - diag) / (t * (t - 1)) if t > 1 else torch.full_like(mean_norm, math.nan)

    a = x - x.mean(dim=1, keepdim=True)
    fro = torch.linalg.vector_norm(x, dim=(1, 2))
    rho = torch.where(fro > 0, torch.linalg.vector_norm(a, dim=(1, 2)) / torch.where(fro > 0, fro, 1.0),
                      torch.zeros_like(fro))
    s = torch.linalg.svdvals(torch.cat([x, a]))  # [2N, min(T, D)], descending: raw, then centred
    raw, cen = _spectral(s[:n], t, d), _spectral(s[n:], t, d)
    nan = torch.full_like(mean_norm, math.nan)
    defined = rho >= min_centred_energy
    cen = {k: torch.where(defined, v, nan) for k, v in cen.items()}
    spectral = cen if center else raw

    out = {
        "eff_rank": spectral["eff_rank"],
        "eff_rank_norm": spectral["eff_rank_norm"],
        "stable_rank": spectral["stable_rank"],
        "cosine": cosine,
        "rank1_residual": spectral["rank1_residual"],
        "norm": mean_norm,
        "eff_rank_norm_raw": raw["eff_rank_norm"],
        "eff_rank_norm_centred": cen["eff_rank_norm"],
        "centred_energy": rho,
    }
    if not all_finite:
        out = {k: torch.where(finite, v, nan) for k, v in out.items()}
    return out


def _batch_mean(per_seq: dict[str, Tensor], num_layers: int, batch: int) -> list[dict[str, float]]:
    """[num_layers * batch] values -> one dict of batch means per layer (one device sync)."""
    keys = list(per_seq)
    reduce = {k: (lambda v: v.min(dim=1).values) if k in MIN_OVER_BATCH else (lambda v: v.mean(dim=1)) for k in keys}
    stacked = torch.stack([reduce[k](per_seq[k].reshape(num_layers, batch)) for k in keys])  # [K, L]
    rows = stacked.T.cpu().tolist()
    return [dict(zip(keys, row)) for row in rows]


def hidden_geometry(h: Tensor, center: bool = False, min_centred_energy: float | None = None) -> dict[str, float]:
    """Batch-averaged metrics of one layer's hidden states ``h: [batch, tokens, width]`` (centred_energy:
    the minimum over the batch, so a layer's centred rank is defined only where every sequence's is)."""
    if h.dim() == 2:
        h = h.unsqueeze(0)
    return _batch_mean(per_sequence_geometry(h, center, min_centred_energy), 1, h.shape[0])[0]


def layer_geometry(hiddens: Sequence[Tensor], center: bool = False,
                   max_elements: int = DEFAULT_MAX_ELEMENTS,
                   min_centred_energy: float | None = None) -> list[dict[str, Any]]:
    """Per-layer geometry of the residual stream.

    ``hiddens``: the input of every block followed by the final block output, each
    ``[batch, tokens, width]`` (any dtype/device; computed in float64 on that device). Layers of
    equal shape are stacked and sent through one batched SVD (in chunks of at most
    ``max_elements`` float64 elements), so the cost is one kernel call, not one per sequence.

    Returns one dict per layer with the keys LAYER_KEYS (Python floats; ``layer`` is the list index):
    ``eff_rank, eff_rank_norm, stable_rank, rank1_residual`` raw, or mean-centred with ``center``;
    ``eff_rank_norm_raw`` and ``eff_rank_norm_centred`` always; ``centred_energy`` = the batch minimum of
    rho = ||A - mean token||_F / ||A||_F. Centred metrics are NaN where rho < ``min_centred_energy``
    (default: :func:`centred_energy_threshold` of each layer's dtype, i.e. of the forward pass).
    """
    hs = [h.detach() if h.dim() == 3 else h.detach().unsqueeze(0) for h in hiddens]
    results: list[dict[str, Any] | None] = [None] * len(hs)
    # group consecutive layers of equal shape/device (normally: all of them)
    i = 0
    while i < len(hs):
        shape, device, dtype = hs[i].shape, hs[i].device, hs[i].dtype
        per_layer = max(1, max_elements // max(1, hs[i].numel()))
        j = i
        while (j < len(hs) and j - i < per_layer and hs[j].shape == shape and hs[j].device == device
               and hs[j].dtype == dtype):
            j += 1
        group = torch.stack([h.to(torch.float64) for h in hs[i:j]])  # [G, B, T, D]
        g, b = group.shape[0], group.shape[1]
        thr = centred_energy_threshold(dtype) if min_centred_energy is None else min_centred_energy
        stats = per_sequence_geometry(group.reshape(g * b, *group.shape[2:]), center, thr)
        for k, row in enumerate(_batch_mean(stats, g, b)):
            results[i + k] = {"layer": i + k, **row}
        i = j
    return [r for r in results if r is not None]


def geometry_summary(layers: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Scalars for a status line / dashboards: the minimum normalised effective rank and its layer,
    the last layer's effective rank, the maximum token cosine similarity and its layer. NaN
    values are ignored unless every layer is NaN."""
    if not layers:
        return {}

    def pick(key: str, fn) -> tuple[float, int]:
        vals = [(float(l[key]), int(l["layer"])) for l in layers if l.get(key) is not None]
        finite = [v for v in vals if math.isfinite(v[0])]
        if not finite:
            return math.nan, -1
        return fn(finite, key=lambda v: v[0])

    mn, mn_layer = pick("eff_rank_norm", min)
    mx, mx_layer = pick("cosine", max)
    last = layers[-1]
    return {
        "min_eff_rank_norm": mn,
        "min_eff_rank_norm_layer": mn_layer,
        "last_eff_rank": float(last["eff_rank"]) if last.get("eff_rank") is not None else math.nan,
        "last_eff_rank_norm": float(last["eff_rank_norm"]) if last.get("eff_rank_norm") is not None else math.nan,
        "max_cosine": mx,
        "max_cosine_layer": mx_layer,
    }


# ----------------------------------------------------------------------------------------------
# MGT operator statistics


def _root_sum_sq(v: Tensor | float | None) -> float | None:
    """Frobenius norm of a tensor; for per-token norms this equals the norm of the full tensor."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        return float(torch.linalg.vector_norm(v.detach().to(torch.float64)))
    return float(v)


def mgt_op_stats(beta: Tensor | None, gate: Tensor | None = None, alpha: Tensor | float | None = None,
                 update: Tensor | float | None = None, residual: Tensor | float | None = None) -> dict[str, Any]:
    """Statistics of one MGT residual sublayer at the probe batch.

    beta: ``[B, T, C]`` or ``[B, T, 1]`` (per channel or per token); gate: ``[B, T, d]`` in (0, 1);
    alpha: the learnable erasure strength (scalar or per channel); update: the added term
    ``beta * (V - alpha X)`` as a tensor, its per-token norms, or a precomputed norm; residual: the
    stream ``X`` entering the sublayer, same forms. ``update_ratio = ||update||_F / ||X||_F``
    (root-sum-square over whatever was given, which is the Frobenius norm in both tensor forms).

    Returns a dict with OP_KEYS; a statistic whose input is missing is None. ``beta_std`` is the
    population std; ``beta_hist`` are counts over BETA_HIST_EDGES (outliers in the edge bins).
    """
    out: dict[str, Any] = {k: None for k in OP_KEYS}
    if beta is not None:
        b = beta.detach().to(torch.float64).reshape(-1)
        b = b[torch.isfinite(b)]
        if b.numel():
            lo, hi = float(BETA_HIST_EDGES[0]), float(BETA_HIST_EDGES[-1])
            hist = torch.histc(b.clamp(lo, hi), bins=len(BETA_HIST_EDGES) - 1, min=lo, max=hi)
            vals = torch.stack([b.mean(), b.std(correction=0), (b < 0).to(torch.float64).mean()]).cpu().tolist()
            out.update(beta_mean=vals[0], beta_std=vals[1], beta_frac_negative=vals[2],
                       beta_hist=[int(c) for c in hist.cpu().tolist()])
    if gate is not None:
        g = gate.detach().to(torch.float64).reshape(-1)
        sat = ((g < GATE_SATURATION_LOW) | (g > GATE_SATURATION_HIGH)).to(torch.float64).mean()
        vals = torch.stack([g.mean(), sat]).cpu().tolist()
        out.update(gate_mean=vals[0], gate_saturation=vals[1])
    if alpha is not None:
        out["alpha_mean"] = float(alpha.detach().to(torch.float64).mean()) if isinstance(alpha, Tensor) else float(alpha)
    un, rn = _root_sum_sq(update), _root_sum_sq(residual)
    if un is not None and rn is not None:
        out["update_ratio"] = un / rn if rn > 0 else (math.inf if un > 0 else 0.0)
    return out


_TENSOR_ARGS = ("beta", "gate", "alpha", "update", "residual")


def summarise_mgt_ops(captures: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Operator statistics for every captured sublayer, in depth order.

    Each capture is a mapping with any of the tensor keys ``beta, gate, alpha, update, residual``
    (see :func:`mgt_op_stats`) plus optional identification (e.g. ``block``, ``kind`` "attn"/"ffn",
    ``name``) that is copied through. Every output dict gets ``sublayer`` = its index (depth order).
    An empty list (non-MGT residuals) gives an empty list.
    """
    out = []
    for j, cap in enumerate(captures):
        stats = mgt_op_stats(**{k: cap.get(k) for k in _TENSOR_ARGS})
        ident = {k: v for k, v in cap.items() if k not in _TENSOR_ARGS and not isinstance(v, Tensor)}
        out.append({"sublayer": j, **ident, **stats})
    return out


def make_geometry_record(step: int, layers: Sequence[Mapping[str, Any]],
                         ops: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One line of geometry.jsonl (schema documented in mgt_scale.monitor.loggers)."""
    rec: dict[str, Any] = {"step": int(step), "layers": [dict(l) for l in layers], "ops": [dict(o) for o in ops]}
    if ops:
        rec["beta_hist_edges"] = [float(e) for e in BETA_HIST_EDGES]
    return rec


# ----------------------------------------------------------------------------------------------
# Statistics of the published baselines' residual operators (mgt_scale.model.residual_baselines)

BETA_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def baseline_op_stats(cap: Mapping[str, Any]) -> dict[str, Any]:
    """Statistics of one `mhc` or `ddl_delta` sublayer from its capture; {} for any other operator.

    mhc (captures h_pre [B, T, n], h_post [B, T, n], h_res [B, T, n, n]): ``h_res_row_dev`` and
    ``h_res_col_dev`` = the largest |row sum - 1| and |column sum - 1| of H_res over all tokens (how far
    Sinkhorn-Knopp is from doubly stochastic), ``h_res_diag_mean`` (1 = identity mixing, 1/n = uniform),
    ``h_res_min``, ``h_pre_mean``, ``h_post_mean``.
    ddl_delta (captures beta [B, T, 1] in (0, 2), delta_value, delta_proj [B, T, 1]): ``beta_quantiles`` =
    beta's [min, 10 %, median, 90 %, max] (beta_mean/std/hist come from :func:`mgt_op_stats`, whose
    histogram stops at 1.5), ``delta_value_mean`` (v) and ``delta_proj_mean`` (k^T X).
    """
    out: dict[str, Any] = {}
    h_res = cap.get("h_res")
    if h_res is not None:
        h = h_res.detach().to(torch.float64)
        vals = torch.stack([(h.sum(dim=-1) - 1).abs().max(), (h.sum(dim=-2) - 1).abs().max(),
                            h.diagonal(dim1=-2, dim2=-1).mean(), h.min()]).cpu().tolist()
        out.update(h_res_row_dev=vals[0], h_res_col_dev=vals[1], h_res_diag_mean=vals[2], h_res_min=vals[3])
    for key in ("h_pre", "h_post", "delta_value", "delta_proj"):
        t = cap.get(key)
        if t is not None:
            out[f"{key}_mean"] = float(t.detach().to(torch.float64).mean())
    if cap.get("delta_value") is not None and cap.get("beta") is not None:
        b = cap["beta"].detach().to(torch.float64).reshape(-1)
        b = b[torch.isfinite(b)]
        if b.numel():
            q = torch.quantile(b, torch.tensor(BETA_QUANTILES, dtype=torch.float64, device=b.device))
            out["beta_quantiles"] = [float(v) for v in q.cpu().tolist()]
    return out
