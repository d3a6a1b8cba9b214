# The figures of `mgt report` (mgt_scale/monitor/report.py): loss, effective rank by layer over training
# (with the collapse alarm threshold as a contour and a line), beta by depth over every probe (a heatmap
# with a labelled, zero-centred colour scale), cosine and norm by depth over every probe. Each plot
# function writes its PNG and returns the Figure so tests can inspect what was drawn.
"""Matplotlib figures of a run report (object API with the Agg canvas: no pyplot global state)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgt_scale.config import MonitorConfig
from mgt_scale.monitor.metrics import BETA_HIST_EDGES

ALARM_GID = "alarm_threshold"  # matplotlib gid of every drawn alarm threshold (tests find them by it)
ALARM_COLOR = "red"


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _series(metrics: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], _num(r[key])) for r in metrics if key in r and r[key] is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def _layer_matrix(geometry: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """[num_layers, num_probes] of one per-layer metric (NaN where missing)."""
    nl = max(len(g["layers"]) for g in geometry)
    m = np.full((nl, len(geometry)), np.nan)
    for j, g in enumerate(geometry):
        for i, layer in enumerate(g["layers"]):
            idx = int(layer.get("layer", i))
            m[idx if 0 <= idx < nl else i, j] = _num(layer.get(key))
    return m


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (for pcolormesh with uneven probe steps)."""
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = 0.5 * (x[1:] + x[:-1])
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


# ----------------------------------------------------------------------------------------------
# Plots


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def plot_loss(metrics: Sequence[dict[str, Any]], path: Path, dpi: int) -> None:
    fig = _figure(8, 5.5)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    s, v = _series(metrics, "loss")
    ax.plot(s, v, lw=1.2, label="train loss")
    vs, vv = _series(metrics, "valid_loss")
    if len(vs):
        ax.plot(vs, vv, "o-", ms=4, lw=1.2, label="valid loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Loss")
    ls, lv = _series(metrics, "lr")
    if len(ls):
        ax_lr.plot(ls, lv, color="tab:gray", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.savefig(path, dpi=dpi)


def _step_colours(geometry: Sequence[dict[str, Any]]):
    """(colormap, norm) mapping a probe's step to its line colour, for one line per probe."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    steps = [float(g["step"]) for g in geometry]
    lo, hi = min(steps), max(steps)
    return colormaps["viridis"], Normalize(lo - 1, hi + 1) if lo == hi else Normalize(lo, hi)


def _step_colorbar(fig, axes, cmap, norm) -> None:
    from matplotlib.cm import ScalarMappable

    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="probe step (one line per probe)")
    _integer_ticks(cbar.ax.yaxis)


def _alarm_note(value: float, key: str, mon: MonitorConfig | None) -> str:
    if mon is None:
        return "no config.yaml in the run directory: alarm threshold not drawn"
    if value <= 0:
        return f"collapse alarm off (monitor.{key} = 0)"
    after = f", from step {mon.alarm_after_step}" if mon.alarm_after_step > 0 else ""
    return f"red: collapse alarm, monitor.{key} = {value:g}{after}"


def plot_eff_rank_heatmap(geometry: Sequence[dict[str, Any]], path: Path, dpi: int,
                          mon: MonitorConfig | None = None):
    """Heatmap layer x step of eff_rank_norm (alarm threshold as a contour and a colourbar mark),
    and below it the minimum over layers and the last layer per probe against the threshold."""
    m = _layer_matrix(geometry, "eff_rank_norm")
    steps = np.asarray([g["step"] for g in geometry], dtype=np.float64)
    thr = mon.alarm_eff_rank_norm_below if mon is not None else 0.0
    fig = _figure(9, max(5.5, min(14.0, 4.5 + 0.06 * m.shape[0])))
    axd = fig.subplot_mosaic([["heat", "cbar"], ["min", "."]], height_ratios=[3, 1.4], width_ratios=[1, 0.03])
    ax, ax_min = axd["heat"], axd["min"]
    ax.set_label("eff_rank_heatmap")
    ax_min.set_label("eff_rank_min")
    ax_min.sharex(ax)
    mesh = ax.pcolormesh(_edges(steps), np.arange(m.shape[0] + 1) - 0.5, np.ma.masked_invalid(m),
                         cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
    cbar = fig.colorbar(mesh, cax=axd["cbar"], label="effective rank / min(tokens, width)")
    if thr > 0:
        cbar.ax.axhline(thr, color=ALARM_COLOR, lw=2.5, gid=ALARM_GID)
        if m.shape[0] >= 2 and len(steps) >= 2 and np.isfinite(m).any():
            with warnings.catch_warnings():  # "no contour levels": nothing crosses the threshold
                warnings.simplefilter("ignore")
                cs = ax.contour(steps, np.arange(m.shape[0]), np.ma.masked_invalid(m), levels=[thr],
                                colors=ALARM_COLOR, linewidths=1.5)
            cs.set_gid(ALARM_GID)
    ax.set_ylabel("layer (0 = embedding output)")
    _integer_ticks(ax.yaxis)
    ax.tick_params(labelbottom=False)
    ax.set_title("Normalised effective rank of the residual stream by layer over training\n"
                 + _alarm_note(thr, "alarm_eff_rank_norm_below", mon), fontsize=10)
    ax_min.plot(steps, np.fmin.reduce(m, axis=0), ".-", color="tab:blue", label="min over layers")
    ax_min.plot(steps, m[-1], ".-", color="tab:orange", lw=1, label="last layer")
    if thr > 0:
        ax_min.axhline(thr, color=ALARM_COLOR, ls="--", lw=1.5, gid=ALARM_GID, label=f"alarm below {thr:g}")
        if steps[0] < mon.alarm_after_step <= steps[-1]:  # outside the probes it would only squeeze the plot
            ax_min.axvline(mon.alarm_after_step, color="gray", ls=":", label="alarms from here")
    ax_min.set_ylim(0.0, 1.05)
    ax_min.set_xlabel("step")
    _integer_ticks(ax_min.xaxis)
    ax_min.set_ylabel("eff. rank / min(T, d)")
    ax_min.grid(alpha=0.3)
    ax_min.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=dpi)
    return fig


def _op_matrix(probes: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """[num_sublayers, num_probes] of one operator statistic (NaN where missing)."""
    n = max(len(g["ops"]) for g in probes)
    m = np.full((n, len(probes)), np.nan)
    for j, g in enumerate(probes):
        for i, op in enumerate(g["ops"]):
            idx = int(op.get("sublayer", i))
            m[idx if 0 <= idx < n else i, j] = _num(op.get(key))
    return m


def _value_norm(values: np.ndarray):
    """(colormap name, norm) for signed values: diverging and centred at 0 when they cross 0, else
    sequential over their range; the colourbar then spans exactly the data."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if lo < 0.0 < hi:
        return "RdBu_r", TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)
    if lo == hi:
        pad = 0.05 * max(abs(lo), 1e-3)
        lo, hi = lo - pad, hi + pad
    return "viridis", Normalize(lo, hi)


def plot_beta_by_depth(geometry: Sequence[dict[str, Any]], path: Path, dpi: int):
    """Four panels over the probes with operator statistics: mean beta as a heatmap sublayer x step
    (colourbar in beta units), the beta distribution by sublayer at the last probe, and mean beta and
    the fraction of negative beta by depth, one line per probe coloured by step. None (no file) if
    no probe has ops."""
    with_ops = [g for g in geometry if g.get("ops")]
    if not with_ops:
        return None
    last = with_ops[-1]
    steps = np.asarray([g["step"] for g in with_ops], dtype=np.float64)
    beta = _op_matrix(with_ops, "beta_mean")
    nops = beta.shape[0]
    fig = _figure(14, max(8.0, min(16.0, 6.0 + 0.08 * nops)))
    (ax_m, ax_h), (ax_l, ax_f) = fig.subplots(2, 2)
    for a, name in ((ax_m, "beta_heatmap"), (ax_h, "beta_hist"), (ax_l, "beta_mean"), (ax_f, "beta_frac_negative")):
        a.set_label(name)

    cmap, norm = _value_norm(beta)
    mesh = ax_m.pcolormesh(_edges(steps), np.arange(nops + 1) - 0.5, np.ma.masked_invalid(beta), cmap=cmap,
                           norm=norm, shading="flat")
    fig.colorbar(mesh, ax=ax_m, label="mean beta (< 0: erasing)")
    ax_m.set_xlabel("step")
    _integer_ticks(ax_m.xaxis)
    ax_m.set_ylabel("sublayer (depth order)")
    _integer_ticks(ax_m.yaxis)
    ax_m.set_title("mean beta by sublayer over training")

    edges = np.asarray(last.get("beta_hist_edges") or BETA_HIST_EDGES, dtype=np.float64)
    hist = np.full((len(last["ops"]), len(edges) - 1), np.nan)
    for j, op in enumerate(last["ops"]):
        if op.get("beta_hist"):
            c = np.asarray(op["beta_hist"], dtype=np.float64)
            hist[j] = c / max(c.sum(), 1.0)
    hmesh = ax_h.pcolormesh(edges, np.arange(len(last["ops"]) + 1) - 0.5, np.ma.masked_invalid(hist),
                            cmap="magma", shading="flat")
    fig.colorbar(hmesh, ax=ax_h, label="fraction of the sublayer's beta entries")
    ax_h.axvline(0.0, color="white", lw=0.8, ls="--")
    ax_h.set_xlabel(f"beta (bins; values beyond {edges[0]:g} / {edges[-1]:g} in the edge bins)")
    ax_h.set_ylabel("sublayer (depth order)")
    _integer_ticks(ax_h.yaxis)
    ax_h.set_title(f"beta distribution by sublayer, step {last['step']}")

    scmap, snorm = _step_colours(with_ops)
    frac = _op_matrix(with_ops, "beta_frac_negative")
    d = np.arange(nops)
    marker = "." if len(with_ops) <= 12 else None
    for j, g in enumerate(with_ops):
        c = scmap(snorm(g["step"]))
        ax_l.plot(d, beta[:, j], color=c, lw=1, marker=marker, gid=f"probe_step_{g['step']}")
        ax_f.plot(d, frac[:, j], color=c, lw=1, marker=marker, gid=f"probe_step_{g['step']}")
    _step_colorbar(fig, [ax_l, ax_f], scmap, snorm)
    ax_l.axhline(0.0, color="black", lw=0.6)
    ax_l.set_ylabel("mean beta")
    ax_l.set_title("mean beta by depth, every probe")
    ax_f.set_ylim(-0.02, 1.02)
    ax_f.set_ylabel("fraction of beta < 0 (erasure)")
    ax_f.set_title("erasure fraction by depth, every probe")
    for a in (ax_l, ax_f):
        a.set_xlabel("sublayer (depth order)")
        _integer_ticks(a.xaxis)
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=dpi)
    return fig


def plot_cosine_by_depth(geometry: Sequence[dict[str, Any]], path: Path, dpi: int,
                         mon: MonitorConfig | None = None):
    """Token cosine similarity and residual norm by layer, one line per probe coloured by step; the
    cosine alarm threshold as a horizontal line."""
    fig = _figure(12, 4.8)
    ax_c, ax_n = fig.subplots(1, 2)
    ax_c.set_label("cosine")
    ax_n.set_label("norm")
    cmap, norm = _step_colours(geometry)
    marker = "." if len(geometry) <= 12 else None
    for g in geometry:
        layers = np.arange(len(g["layers"]))
        c = cmap(norm(g["step"]))
        ax_c.plot(layers, [_num(l.get("cosine")) for l in g["layers"]], color=c, lw=1, marker=marker,
                  gid=f"probe_step_{g['step']}")
        ax_n.plot(layers, [_num(l.get("norm")) for l in g["layers"]], color=c, lw=1, marker=marker,
                  gid=f"probe_step_{g['step']}")
    _step_colorbar(fig, [ax_c, ax_n], cmap, norm)
    thr = mon.alarm_cosine_above if mon is not None else 0.0
    if thr > 0:
        ax_c.axhline(thr, color=ALARM_COLOR, ls="--", lw=1.5, gid=ALARM_GID, label=f"collapse alarm above {thr:g}")
        ax_c.legend(fontsize=8)
    ax_c.set_ylabel("mean pairwise token cosine similarity")
    ax_c.set_title("Token cosine similarity by depth\n" + _alarm_note(thr, "alarm_cosine_above", mon), fontsize=10)
    ax_n.set_ylabel("mean token norm")
    ax_n.set_title("Residual-stream norm by depth", fontsize=10)
    norms = np.asarray([_num(l.get("norm")) for g in geometry for l in g["layers"]])
    norms = norms[np.isfinite(norms)]
    if len(norms) and norms.min() > 0 and norms.max() / norms.min() > 20:  # norm growth over decades
        ax_n.set_yscale("log")
    for ax in (ax_c, ax_n):
        ax.set_xlabel("layer")
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=dpi)
    return fig


# ----------------------------------------------------------------------------------------------
# Markdown
