# Figures of a sweep (PNG, matplotlib Agg): normalised effective rank by layer (init vs trained) per
# residual kind, depth scaling (last-layer rank and valid loss vs depth), the ablation bar chart with
# the synergy of gate + erasure, and beta distributions by depth for the MGT-family cells.
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mgt_scale.experiments.collect import _mean, synergy

KIND_ORDER = ("postln", "preln", "deepnorm", "mhc", "mhc_gate", "ddl_delta", "ddl", "mgt")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _kinds(rows):
    present = {r["residual"] for r in rows}
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def rank_by_layer(cells: list[dict[str, Any]], out: Path) -> Path | None:
    """cells: [{row, init: geometry record|None, final: geometry record|None}]. One panel per
    residual kind; one colour per depth (first seed); dashed = init, solid = trained."""
    cells = [c for c in cells if c.get("init") or c.get("final")]
    if not cells:
        return None
    plt = _plt()
    kinds = _kinds([c["row"] for c in cells])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.4), squeeze=False, sharey=True)
    depths = sorted({c["row"]["depth"] for c in cells}, key=float)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes[0], kinds):
        seen = set()
        for c in cells:
            r = c["row"]
            if r["residual"] != kind or (r["depth"], kind) in seen:
                continue
            seen.add((r["depth"], kind))
            col = cmap(depths.index(r["depth"]) / max(1, len(depths) - 1))
            for key, ls in (("init", "--"), ("final", "-")):
                rec = c.get(key)
                if not rec:
                    continue
                ys = [l.get("eff_rank_norm") for l in rec["layers"]]
                ys = [np.nan if y is None else y for y in ys]
                xs = np.arange(len(ys)) / max(1, len(ys) - 1)
                ax.plot(xs, ys, ls, color=col, lw=1.2, label=f"L={int(float(r['depth']))} {key}")
        ax.set_title(kind)
        ax.set_xlabel("relative depth (layer / L)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0][0].set_ylabel("normalised effective rank")
    fig.suptitle("effective rank by layer (dashed: init, solid: trained)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def depth_scaling(rows: list[dict], out: Path) -> Path | None:
    depths = sorted({r["depth"] for r in rows if _finite(r.get("depth"))}, key=float)
    if len(depths) < 2:
        return None
    plt = _plt()
    has_loss = any(_finite(r.get("valid_loss")) for r in rows)
    n = 2 if has_loss else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), squeeze=False)
    ax = axes[0][0]
    for i, kind in enumerate(_kinds(rows)):
        col = f"C{i}"
        for key, ls, lab in (("init_rank_last", "--", "init"), ("final_rank_last", "-", "trained")):
            xs, ys = [], []
            for d in depths:
                v = _mean([r[key] for r in rows if r["residual"] == kind and r["depth"] == d])
                if math.isfinite(v):
                    xs.append(d)
                    ys.append(v)
            if xs:
                ax.plot(xs, ys, ls, marker="o" if lab == "trained" else "x", color=col, label=f"{kind} {lab}")
    ax.set_xscale("log")
    ax.set_xticks(depths)
    ax.set_xticklabels([str(int(d)) for d in depths])
    ax.minorticks_off()  # else a log axis labels 2x10^1, 3x10^1... among the depths
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel("last-layer normalised eff. rank")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.5, color="grey", lw=0.7, ls=":")
    ax.axhline(0.1, color="grey", lw=0.7, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if has_loss:
        ax = axes[0][1]
        for i, kind in enumerate(_kinds(rows)):
            xs, ys = [], []
            for d in depths:
                v = _mean([r["valid_loss"] for r in rows if r["residual"] == kind and r["depth"] == d])
                if math.isfinite(v):
                    xs.append(d)
                    ys.append(v)
            if xs:
                ax.plot(xs, ys, "-o", color=f"C{i}", label=kind)
        ax.set_xscale("log")
        ax.set_xticks(depths)
        ax.set_xticklabels([str(int(d)) for d in depths])
        ax.minorticks_off()  # else a log axis labels 2x10^1, 3x10^1... among the depths
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("valid loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def ablation(rows: list[dict], out: Path, metric: str = "valid_loss") -> Path | None:
    syn = synergy(rows, metric)
    if not syn:
        return None
    plt = _plt()
    kinds = ("preln", "mhc_gate", "ddl", "mgt")
    fig, axes = plt.subplots(1, len(syn), figsize=(5 * len(syn), 3.8), squeeze=False)
    for ax, s in zip(axes[0], syn):
        vals = [s[f"{metric}_{k}"] for k in kinds]
        errs = []
        for k in kinds:
            v = [r[metric] for r in rows if r["depth"] == s["depth"] and r["residual"] == k and _finite(r[metric])]
            errs.append(float(np.std(v)) if len(v) > 1 else 0.0)
        ax.bar(kinds, vals, yerr=errs, color=["C0", "C1", "C2", "C3"])
        lo = min(vals) - 0.1 * (max(vals) - min(vals) + 1e-3)
        ax.set_ylim(lo, max(vals) + 0.15 * (max(vals) - min(vals) + 1e-3))
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"L={int(float(s['depth']))}: synergy = {s['synergy']:+.4f}\n"
                     f"gains vs preln: gate {s['gain_mhc_gate']:+.4f}, ddl {s['gain_ddl']:+.4f}, "
                     f"mgt {s['gain_mgt']:+.4f}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def beta_by_depth(cells: list[dict[str, Any]], out: Path, max_panels: int = 8) -> Path | None:
    """Heatmap per MGT-family cell: beta histogram (y) per sublayer (x) at the last probe."""
    picked = []
    for c in cells:
        rec = c.get("final") or c.get("init")
        if rec and rec.get("ops") and rec.get("beta_hist_edges") and any(o.get("beta_hist") for o in rec["ops"]):
            picked.append((c, rec))
    if not picked:
        return None
    picked = picked[:max_panels]
    plt = _plt()
    fig, axes = plt.subplots(1, len(picked), figsize=(3.6 * len(picked), 3.4), squeeze=False)
    for ax, (c, rec) in zip(axes[0], picked):
        edges = np.asarray(rec["beta_hist_edges"], dtype=float)
        hist = np.array([[0 if v is None else v for v in (o.get("beta_hist") or [0] * (len(edges) - 1))]
                         for o in rec["ops"]], dtype=float)
        hist = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
        ax.imshow(hist.T, aspect="auto", origin="lower", cmap="magma",
                  extent=(0, hist.shape[0], edges[0], edges[-1]))
        ax.axhline(0, color="w", lw=0.6, ls=":")
        r = c["row"]
        ax.set_title(f"{r['residual']} L={int(float(r['depth']))} step {rec.get('step')}", fontsize=8)
        ax.set_xlabel("sublayer (attn, ffn per block)")
    axes[0][0].set_ylabel("beta")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
