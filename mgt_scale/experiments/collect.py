# Collects a sweep's run directories into one table: <runs_dir>/results.csv and results.md. Reads
# only files (status.json, metrics.jsonl, geometry.jsonl, and the runner's init_geometry.json /
# eval.json), so it works on any machine that can see the run directories.
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from mgt_scale.config import CONFIG_FILE, MGT_FAMILY
from mgt_scale.monitor.loggers import GEOMETRY_FILE, METRICS_FILE, read_jsonl
from mgt_scale.train.failure import STATUS_FILE

INIT_FILE = "init_geometry.json"
EVAL_FILE = "eval.json"
TRAIN_LOSS_WINDOW = 5  # final train loss = mean of the last this-many logged losses

COLUMNS = ["cell", "seed", "residual", "depth", "d_model", "max_steps", "status", "step",
           "final_train_loss", "valid_loss", "perplexity", "copy_acc",
           "init_rank_last", "init_rank_min", "final_rank_last", "final_rank_min",
           "beta_mean", "beta_frac_negative", "final_geometry_step"]
MD_COLUMNS = [("cell", "cell"), ("residual", "residual"), ("depth", "L"), ("status", "status"),
              ("final_train_loss", "train loss"), ("valid_loss", "valid loss"), ("perplexity", "ppl"),
              ("copy_acc", "copy acc"), ("init_rank_last", "rank@init last"), ("init_rank_min", "rank@init min"),
              ("final_rank_last", "rank trained last"), ("final_rank_min", "rank trained min"),
              ("beta_mean", "beta mean"), ("beta_frac_negative", "beta<0 frac")]


def _read_json(p: Path) -> dict | None:
    try:
        obj = json.loads(p.read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def rank_stats(record: dict | None) -> tuple[float, float]:
    """(last-layer eff_rank_norm, min over layers) of a geometry record."""
    if not record or not record.get("layers"):
        return math.nan, math.nan
    vals = [_num(l.get("eff_rank_norm")) for l in record["layers"]]
    finite = [v for v in vals if math.isfinite(v)]
    return vals[-1], (min(finite) if finite else math.nan)


def beta_stats(record: dict | None) -> tuple[float, float]:
    """(mean beta over all MGT sublayers, mean fraction of negative beta) of a geometry record."""
    ops = (record or {}).get("ops") or []
    means = [_num(o.get("beta_mean")) for o in ops]
    negs = [_num(o.get("beta_frac_negative")) for o in ops]
    means = [v for v in means if math.isfinite(v)]
    negs = [v for v in negs if math.isfinite(v)]
    return (sum(means) / len(means) if means else math.nan, sum(negs) / len(negs) if negs else math.nan)


def last_geometry(run_dir: Path) -> dict | None:
    p = run_dir / GEOMETRY_FILE
    if not p.is_file():
        return None
    recs = [r for r in read_jsonl(p) if "layers" in r]
    return max(recs, key=lambda r: r.get("step", -1)) if recs else None


def final_train_loss(run_dir: Path) -> float:
    p = run_dir / METRICS_FILE
    if not p.is_file():
        return math.nan
    by_step: dict[int, float] = {}
    for r in read_jsonl(p):
        if "loss" in r and "step" in r:
            by_step[int(r["step"])] = _num(r["loss"])
    if not by_step:
        return math.nan
    last = [by_step[s] for s in sorted(by_step)[-TRAIN_LOSS_WINDOW:]]
    last = [v for v in last if math.isfinite(v)]
    return sum(last) / len(last) if last else math.nan


def final_geometry(run_dir: Path) -> dict | None:
    """The monitor's last probe, else the runner's recomputation from the final checkpoint."""
    geo = last_geometry(run_dir)
    if geo is not None:
        return geo
    ev = _read_json(run_dir / EVAL_FILE) or {}
    return ev.get("final_geometry")


def collect_cell(run_dir: Path, cell_name: str, seed: int, cfg_fallback: dict | None = None) -> dict[str, Any]:
    cfg = None
    try:
        import yaml
        cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, Exception):
        cfg = None
    cfg = cfg or cfg_fallback or {}
    model = cfg.get("model", {})
    status = _read_json(run_dir / STATUS_FILE) or {}
    init = _read_json(run_dir / INIT_FILE)
    ev = _read_json(run_dir / EVAL_FILE) or {}
    geo = final_geometry(run_dir)
    row: dict[str, Any] = {"cell": cell_name, "seed": seed, "residual": model.get("residual", ""),
                           "depth": model.get("num_layers", ""), "d_model": model.get("d_model", ""),
                           "max_steps": cfg.get("train", {}).get("max_steps", ""),
                           "status": status.get("state", "init_only" if init and not status else "missing"),
                           "step": status.get("step", "")}
    row["final_train_loss"] = final_train_loss(run_dir)
    row["valid_loss"] = _num(status.get("valid_loss"))
    row["perplexity"] = math.exp(row["valid_loss"]) if math.isfinite(row["valid_loss"]) and row["valid_loss"] < 50 else math.nan
    row["copy_acc"] = _num(ev.get("copy_acc"))
    row["init_rank_last"], row["init_rank_min"] = rank_stats(init)
    row["final_rank_last"], row["final_rank_min"] = rank_stats(geo)
    bsrc = geo if geo is not None else None
    if row["residual"] in MGT_FAMILY and bsrc is not None:
        row["beta_mean"], row["beta_frac_negative"] = beta_stats(bsrc)
    else:
        row["beta_mean"], row["beta_frac_negative"] = math.nan, math.nan
    row["final_geometry_step"] = geo.get("step", "") if geo else ""
    return row


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}"
    return str(v)


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_csv(rows: list[dict], path: Path, extra_cols: list[str] = ()) -> None:
    cols = COLUMNS + [c for c in extra_cols if c not in COLUMNS]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _csv_value(r.get(c, "")) for c in cols})
    tmp.replace(path)


def markdown_table(rows: list[dict], extra_cols: list[str] = ()) -> str:
    cols = list(MD_COLUMNS) + [(c, c.split(".")[-1]) for c in extra_cols]
    # drop columns that are empty for every row (e.g. copy acc on LM sweeps)
    keep = [(k, h) for k, h in cols if any(_fmt(r.get(k, "")) for r in rows)]
    lines = ["| " + " | ".join(h for _, h in keep) + " |", "|" + "|".join("---" for _ in keep) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k, _ in keep) + " |")
    return "\n".join(lines)


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if isinstance(v, float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def synergy(rows: list[dict], metric: str = "valid_loss") -> list[dict[str, Any]]:
    """Per depth: gain of X over preln = metric(preln) - metric(X) (lower is better), for mhc_gate,
    ddl and mgt (seeds averaged), and synergy = gain(mgt) - (gain(mhc_gate) + gain(ddl))."""
    out = []
    depths = sorted({r["depth"] for r in rows if r.get("depth") not in ("", None)}, key=float)
    for d in depths:
        m = {k: _mean([r[metric] for r in rows if r["depth"] == d and r["residual"] == k])
             for k in ("preln", "mhc_gate", "ddl", "mgt")}
        if not all(math.isfinite(v) for v in m.values()):
            continue
        g = {k: m["preln"] - m[k] for k in ("mhc_gate", "ddl", "mgt")}
        out.append({"depth": d, **{f"{metric}_{k}": v for k, v in m.items()},
                    **{f"gain_{k}": v for k, v in g.items()},
                    "synergy": g["mgt"] - (g["mhc_gate"] + g["ddl"])})
    return out
