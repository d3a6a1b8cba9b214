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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgt_scale.config import CONFIG_FILE, MonitorConfig
from mgt_scale.exit_codes import CONFIG_ERROR, FINISHED
from mgt_scale.logs import get_logger
from mgt_scale.monitor.alarms import evaluate_alarms
from mgt_scale.monitor.loggers import GEOMETRY_FILE, METRICS_FILE, read_jsonl
from mgt_scale.monitor.metrics import geometry_summary
from mgt_scale.monitor.report_plots import (
    _num, _series, plot_beta_by_depth, plot_cosine_by_depth, plot_eff_rank_heatmap, plot_loss)

log = get_logger(__name__)

PLOT_FILES = {
    "loss": "loss.png",
    "eff_rank": "eff_rank_heatmap.png",
    "beta": "beta_by_depth.png",
    "cosine": "cosine_by_depth.png",
}
ALARM_KEYS = ("alarm_eff_rank_norm_below", "alarm_cosine_above", "alarm_after_step", "alarm_policy")


class ReportError(Exception):
    """A problem with the run directory; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Loading


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
        log.error(f"mgt report: {e}")
        return CONFIG_ERROR
    log.info(f"mgt report: wrote {out}/report.md and {len(list(out.glob('*.png')))} plot(s)")
    return FINISHED


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
