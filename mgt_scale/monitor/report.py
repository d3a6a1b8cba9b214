# `mgt report RUN_DIR`: reads a run's metrics.jsonl and geometry.jsonl and writes plots people would
# rather look at than read (loss, effective rank by layer over training, beta by depth, cosine by
# depth, every probe) plus report.md with the key numbers, into RUN_DIR/report/. The collapse alarm
# thresholds of RUN_DIR/config.yaml (monitor.alarm_*) are drawn on the plots they apply to.
# Formats: see monitor/loggers.py.
"""Run report: PNG plots and a markdown summary of one run directory.

Uses matplotlib's object API with the Agg canvas (``matplotlib.figure.Figure``), so it never
touches pyplot's global backend and works on headless machines.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgt_scale.config import MonitorConfig
from mgt_scale.monitor.alarms import evaluate_alarms
from mgt_scale.monitor.loggers import GEOMETRY_FILE, METRICS_FILE, read_jsonl
from mgt_scale.monitor.metrics import BETA_HIST_EDGES, geometry_summary

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # mgt_scale.exit_codes.CONFIG_ERROR: bad input, retrying cannot help

PLOT_FILES = {
    "loss": "loss.png",
    "eff_rank": "eff_rank_heatmap.png",
    "beta": "beta_by_depth.png",
    "cosine": "cosine_by_depth.png",
}
CONFIG_FILE = "config.yaml"  # the run's resolved config (written by mgt train)
ALARM_KEYS = ("alarm_eff_rank_norm_below", "alarm_cosine_above", "alarm_after_step", "alarm_policy")
ALARM_GID = "alarm_threshold"  # matplotlib gid of every drawn alarm threshold (tests find them by it)
ALARM_COLOR = "red"


class ReportError(Exception):
    """A problem with the run directory; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Loading


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def merge_by_step(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge records sharing a step in file order (a later key wins), sorted by step. Records
    without a numeric step are dropped."""
    merged: dict[int, dict[str, Any]] = {}
    for r in records:
        s = r.get("step")
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            continue
        merged.setdefault(int(s), {}).update(r)
    return [merged[s] for s in sorted(merged)]


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics merged by step, geometry probes by step). Raises ReportError for an unusable dir."""
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    mpath = run_dir / METRICS_FILE
    if not mpath.is_file():
        raise ReportError(f"{mpath} not found: give the run directory of a training run "
                          f"(its run.dir, which holds {METRICS_FILE} and {GEOMETRY_FILE})")
    metrics = merge_by_step(read_jsonl(mpath))
    if not any(r.get("loss") is not None for r in metrics):
        raise ReportError(f"{mpath} has no records with a step and a loss: nothing to report yet")
    gpath = run_dir / GEOMETRY_FILE
    geometry = merge_by_step(read_jsonl(gpath)) if gpath.is_file() else []
    geometry = [g for g in geometry if g.get("layers")]
    return metrics, geometry


def load_alarm_config(run_dir: Path) -> MonitorConfig | None:
    """The run's collapse alarm settings (monitor.alarm_* of RUN_DIR/config.yaml; keys it lacks take
    MonitorConfig's defaults), or None when the run directory has no config.yaml. Only these keys
    are read, so a config written by another version of mgt-scale still gives its thresholds."""
    import yaml

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        msg = str(e).splitlines()[0] if str(e) else repr(e)
        raise ReportError(f"{path}: cannot read the alarm thresholds ({msg}): fix the file, or move it "
                          "away to report without thresholds") from None
    mon = data.get("monitor") if isinstance(data, dict) else None
    mon = mon if isinstance(mon, dict) else {}
    values: dict[str, Any] = {}
    for key in ALARM_KEYS:
        if key not in mon:
            continue
        v = mon[key]
        if key == "alarm_policy":
            values[key] = str(v)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ReportError(f"{path}: monitor.{key} = {v!r} is not a number: fix the file")
        values[key] = int(v) if key == "alarm_after_step" else float(v)
    return dataclasses.replace(MonitorConfig(), **values)


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
        return f"no {CONFIG_FILE}: alarm threshold not drawn"
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


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def _op_stats(ops: Sequence[dict[str, Any]], key: str) -> tuple[float, float, float, int]:
    """(mean over sublayers, min, max, argmin sublayer) of one operator statistic."""
    vals = np.asarray([_num(o.get(key)) for o in ops])
    if not np.isfinite(vals).any():
        return math.nan, math.nan, math.nan, -1
    return (float(np.nanmean(vals)), float(np.nanmin(vals)), float(np.nanmax(vals)), int(np.nanargmin(vals)))


def _alarm_lines(geometry: Sequence[dict[str, Any]], mon: MonitorConfig | None) -> list[str]:
    """The run's collapse alarm thresholds and the probes that trip them (monitor.alarms rules)."""
    if mon is None:
        return [f"- collapse alarms: no {CONFIG_FILE} in the run directory, thresholds unknown (not drawn)"]
    rules = [f"eff_rank_norm < {mon.alarm_eff_rank_norm_below:g}" if mon.alarm_eff_rank_norm_below > 0 else "",
             f"cosine > {mon.alarm_cosine_above:g}" if mon.alarm_cosine_above > 0 else ""]
    rules = [r for r in rules if r]
    if not rules:
        return ["- collapse alarms: off (monitor.alarm_eff_rank_norm_below = monitor.alarm_cosine_above = 0)"]
    tripped = [g["step"] for g in geometry if evaluate_alarms(mon, int(g["step"]), g["layers"]).tripped]
    where = f", first at step {tripped[0]}, last at step {tripped[-1]}" if tripped else ""
    return [f"- collapse alarms ({CONFIG_FILE}): {' or '.join(rules)} at any layer, from step "
            f"{mon.alarm_after_step}, policy {mon.alarm_policy}; tripped at {len(tripped)} of {len(geometry)} "
            f"probe(s){where}"]


def render_markdown(run_dir: Path, metrics: Sequence[dict[str, Any]], geometry: Sequence[dict[str, Any]],
                    plots: dict[str, str], mon: MonitorConfig | None = None) -> str:
    lines = [f"# Run report: {run_dir.resolve().name}", ""]
    s, v = _series(metrics, "loss")
    lines += ["## Training", "",
              f"- steps logged: {int(s[0])} to {int(s[-1])} ({len(s)} loss records)",
              f"- final train loss: {_fmt(v[-1])} (step {int(s[-1])})"]
    vs, vv = _series(metrics, "valid_loss")
    if len(vs):
        k = int(np.nanargmin(vv)) if np.isfinite(vv).any() else len(vv) - 1
        lines += [f"- final valid loss: {_fmt(vv[-1])} (step {int(vs[-1])})",
                  f"- best valid loss: {_fmt(vv[k])} (step {int(vs[k])})"]
    else:
        lines.append("- valid loss: none logged")
    lines.append("")

    lines += ["## Geometry", ""]
    if not geometry:
        lines += [f"No geometry probes ({GEOMETRY_FILE} missing or empty): set monitor.interval > 0.", ""]
    else:
        nl = len(geometry[-1]["layers"])
        lines += [f"{len(geometry)} probe(s), steps {geometry[0]['step']} to {geometry[-1]['step']}, "
                  f"{nl} layers (0 = embedding output, {nl - 1} = final block output). "
                  "Metrics on the raw (uncentred) token x width matrix of each probe sequence.", "",
                  "| probe | step | min eff_rank_norm | at layer | last-layer eff_rank | last-layer eff_rank_norm "
                  "| max cosine | at layer |",
                  "|---|---|---|---|---|---|---|---|"]
        probes = [("first", geometry[0])] + ([("last", geometry[-1])] if len(geometry) > 1 else [])
        for label, g in probes:
            sm = geometry_summary(g["layers"])
            lines.append(f"| {label} | {g['step']} | {_fmt(sm['min_eff_rank_norm'])} | {sm['min_eff_rank_norm_layer']} "
                         f"| {_fmt(sm['last_eff_rank'], '.2f')} | {_fmt(sm['last_eff_rank_norm'])} "
                         f"| {_fmt(sm['max_cosine'])} | {sm['max_cosine_layer']} |")
        lines += [""] + _alarm_lines(geometry, mon) + [""]

    with_ops = [g for g in geometry if g.get("ops")]
    lines += ["## MGT operators", ""]
    if not with_ops:
        lines += ["No operator statistics (not an MGT-family residual, or not captured).", ""]
    else:
        g = with_ops[-1]
        ops = g["ops"]
        lines += [f"Last probe with operator statistics: step {g['step']}, {len(ops)} sublayers.", "",
                  "| statistic | mean over sublayers | min | max | argmin sublayer |", "|---|---|---|---|---|"]
        for key in ("beta_mean", "beta_std", "beta_frac_negative", "gate_mean", "gate_saturation", "alpha_mean",
                    "update_ratio"):
            mean, lo, hi, arg = _op_stats(ops, key)
            lines.append(f"| {key} | {_fmt(mean)} | {_fmt(lo)} | {_fmt(hi)} | {arg} |")
        neg = sum(1 for o in ops if (o.get("beta_mean") is not None and o["beta_mean"] < 0))
        lines += ["", f"- sublayers with negative mean beta (erasing on average): {neg} of {len(ops)}", ""]

    lines += ["## Plots", ""]
    for name, file in plots.items():
        lines.append(f"![{name}]({file})")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point


def make_report(run_dir: str | Path, out_dir: str | Path | None = None, dpi: int = 110) -> Path:
    """Write the PNGs and report.md; returns the output directory. Raises ReportError."""
    run_dir = Path(run_dir)
    metrics, geometry = load_run(run_dir)
    mon = load_alarm_config(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    plot_loss(metrics, out / PLOT_FILES["loss"], dpi)
    plots["loss"] = PLOT_FILES["loss"]
    if geometry:
        plot_eff_rank_heatmap(geometry, out / PLOT_FILES["eff_rank"], dpi, mon)
        plots["effective rank by layer"] = PLOT_FILES["eff_rank"]
        if plot_beta_by_depth(geometry, out / PLOT_FILES["beta"], dpi) is not None:
            plots["beta by depth"] = PLOT_FILES["beta"]
        plot_cosine_by_depth(geometry, out / PLOT_FILES["cosine"], dpi, mon)
        plots["cosine similarity by depth"] = PLOT_FILES["cosine"]
    (out / "report.md").write_text(render_markdown(run_dir, metrics, geometry, plots, mon), encoding="utf-8")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help=f"run directory holding {METRICS_FILE} (and {GEOMETRY_FILE})")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNG files (default: 110)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgt report",
        description="Plot a training run: loss curves (train and valid), effective rank by layer over "
                    "training (heatmap), beta by depth and over training, token cosine similarity by depth "
                    "(one line per probe); the collapse alarm thresholds of RUN_DIR/config.yaml "
                    "(monitor.alarm_*) are drawn in red. Writes report.md with the key numbers. "
                    "Output: RUN_DIR/report/.")
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        out = make_report(args.run_dir, args.out, args.dpi)
    except ReportError as e:
        print(f"mgt report: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"mgt report: wrote {out}/report.md and {len(list(out.glob('*.png')))} plot(s)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
