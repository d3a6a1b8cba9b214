# `mgt report RUN_DIR`: reads a run's metrics.jsonl and geometry.jsonl and writes plots people would
# rather look at than read (loss, effective rank by layer over training, beta by depth, cosine by
# depth) plus report.md with the key numbers, into RUN_DIR/report/. Formats: see monitor/loggers.py.
"""Run report: PNG plots and a markdown summary of one run directory.

Uses matplotlib's object API with the Agg canvas (``matplotlib.figure.Figure``), so it never
touches pyplot's global backend and works on headless machines.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


def plot_eff_rank_heatmap(geometry: Sequence[dict[str, Any]], path: Path, dpi: int) -> None:
    m = _layer_matrix(geometry, "eff_rank_norm")
    steps = np.asarray([g["step"] for g in geometry], dtype=np.float64)
    fig = _figure(9, max(3.5, min(12.0, 2.5 + 0.06 * m.shape[0])))
    ax = fig.subplots()
    mesh = ax.pcolormesh(_edges(steps), np.arange(m.shape[0] + 1) - 0.5, np.ma.masked_invalid(m),
                         cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
    fig.colorbar(mesh, ax=ax, label="effective rank / min(tokens, width)")
    ax.set_xlabel("step")
    ax.set_ylabel("layer (0 = embedding output)")
    _integer_ticks(ax.yaxis)
    ax.set_title("Normalised effective rank of the residual stream by layer over training")
    fig.savefig(path, dpi=dpi)


def plot_beta_by_depth(geometry: Sequence[dict[str, Any]], path: Path, dpi: int) -> bool:
    """Beta histograms by sublayer at the last probe with ops stats, and beta mean / fraction
    negative by depth (first and last such probe). False (no file) if no probe has ops."""
    with_ops = [g for g in geometry if g.get("ops")]
    if not with_ops:
        return False
    first, last = with_ops[0], with_ops[-1]
    edges = np.asarray(last.get("beta_hist_edges") or BETA_HIST_EDGES, dtype=np.float64)
    ops = last["ops"]
    hist = np.full((len(ops), len(edges) - 1), np.nan)
    for j, op in enumerate(ops):
        if op.get("beta_hist"):
            c = np.asarray(op["beta_hist"], dtype=np.float64)
            hist[j] = c / max(c.sum(), 1.0)
    fig = _figure(13, max(4.0, min(12.0, 2.5 + 0.05 * len(ops))))
    ax_h, ax_l = fig.subplots(1, 2, width_ratios=[1.3, 1])
    mesh = ax_h.pcolormesh(edges, np.arange(len(ops) + 1) - 0.5, np.ma.masked_invalid(hist), cmap="magma",
                           shading="flat")
    fig.colorbar(mesh, ax=ax_h, label="fraction of beta entries")
    ax_h.axvline(0.0, color="white", lw=0.8, ls="--")
    ax_h.set_xlabel("beta")
    ax_h.set_ylabel("sublayer (depth order)")
    _integer_ticks(ax_h.yaxis)
    ax_h.set_title(f"beta distribution by depth, step {last['step']}")
    probes = [(last, "-")] if first is last else [(first, "--"), (last, "-")]
    for g, style in probes:
        d = np.arange(len(g["ops"]))
        ax_l.plot(d, [_num(o.get("beta_mean")) for o in g["ops"]], style, color="tab:blue",
                  label=f"beta mean, step {g['step']}")
        ax_l.plot(d, [_num(o.get("beta_frac_negative")) for o in g["ops"]], style, color="tab:red",
                  label=f"fraction beta < 0, step {g['step']}")
    ax_l.axhline(0.0, color="black", lw=0.6)
    ax_l.set_xlabel("sublayer (depth order)")
    _integer_ticks(ax_l.xaxis)
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=8)
    ax_l.set_title("beta mean and erasure fraction by depth")
    fig.savefig(path, dpi=dpi)
    return True


def plot_cosine_by_depth(geometry: Sequence[dict[str, Any]], path: Path, dpi: int) -> None:
    fig = _figure(11, 4.5)
    ax_c, ax_n = fig.subplots(1, 2)
    probes = [geometry[0]] if len(geometry) == 1 else [geometry[0], geometry[-1]]
    for g, style in zip(probes, ("--", "-")):
        layers = np.arange(len(g["layers"]))
        ax_c.plot(layers, [_num(l.get("cosine")) for l in g["layers"]], style, marker=".", label=f"step {g['step']}")
        ax_n.plot(layers, [_num(l.get("norm")) for l in g["layers"]], style, marker=".", label=f"step {g['step']}")
    ax_c.set_ylabel("mean pairwise token cosine similarity")
    ax_c.set_title("Token cosine similarity by depth")
    ax_n.set_ylabel("mean token norm")
    ax_n.set_title("Residual-stream norm by depth")
    norms = np.asarray([_num(l.get("norm")) for g in probes for l in g["layers"]])
    norms = norms[np.isfinite(norms)]
    if len(norms) and norms.min() > 0 and norms.max() / norms.min() > 20:  # norm growth over decades
        ax_n.set_yscale("log")
    for ax in (ax_c, ax_n):
        ax.set_xlabel("layer")
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=dpi)


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


def render_markdown(run_dir: Path, metrics: Sequence[dict[str, Any]], geometry: Sequence[dict[str, Any]],
                    plots: dict[str, str]) -> str:
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
        lines.append("")

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
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    plot_loss(metrics, out / PLOT_FILES["loss"], dpi)
    plots["loss"] = PLOT_FILES["loss"]
    if geometry:
        plot_eff_rank_heatmap(geometry, out / PLOT_FILES["eff_rank"], dpi)
        plots["effective rank by layer"] = PLOT_FILES["eff_rank"]
        if plot_beta_by_depth(geometry, out / PLOT_FILES["beta"], dpi):
            plots["beta by depth"] = PLOT_FILES["beta"]
        plot_cosine_by_depth(geometry, out / PLOT_FILES["cosine"], dpi)
        plots["cosine similarity by depth"] = PLOT_FILES["cosine"]
    (out / "report.md").write_text(render_markdown(run_dir, metrics, geometry, plots), encoding="utf-8")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help=f"run directory holding {METRICS_FILE} (and {GEOMETRY_FILE})")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNG files (default: 110)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgt report",
        description="Plot a training run: loss curves, effective rank by layer over training (heatmap), "
                    "beta distributions by depth, token cosine similarity by depth; and write report.md "
                    "with the key numbers. Output: RUN_DIR/report/.")
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
