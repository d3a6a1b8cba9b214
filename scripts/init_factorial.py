#!/usr/bin/env python
# The init factorial of issue #33: geometry at initialisation (no training) for every residual kind x
# depth x seed x init scheme x alpha_init, probed in float64 on a fixed batch of the validation split.
# Appends one row per cell to a CSV (default docs/data/init_factorial.csv) and skips cells already
# there, so an interrupted run resumes where it stopped. Usage:
#   python scripts/init_factorial.py [--depths 12 48 100 200] [--seeds 0 1 2] [--out CSV]
"""Init schemes (the output projections are what differ; everything else as in MGTModel.init_weights):
  depth_scaled   model.init_std 0.02, attn.out / ffn.down at 0.02 * (2L)^-1/2 (the default)
  unscaled       model.depth_scaled_init: false, every matrix at 0.02
  torch_default  every nn.Linear re-drawn with PyTorch's own reset_parameters() (U(+-1/sqrt(fan_in)))
                 after our init, from torch.manual_seed(seed); embedding and MGT projections unchanged.
`torch_default` is not a config option (model code is not changed for it): it exists in this script only.
alpha_init {0, 0.1} applies to the kinds with beta (ddl, mgt); other kinds run once (alpha empty)."""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

KINDS = ("postln", "preln", "deepnorm", "mhc_gate", "ddl", "mgt")
INITS = ("depth_scaled", "unscaled", "torch_default")
FIELDS = ["residual", "depth", "seed", "init", "alpha_init", "probe_tokens", "raw_last", "centred_last", "rho_last",
          "raw_min", "raw_min_layer", "centred_min", "rho_min", "rho_min_layer", "undefined_layers", "seconds"]


def build(base: str, kind: str, depth: int, seed: int, init: str, alpha: float | None, batch: int, seq: int):
    from mgt_scale.config import load_config
    from mgt_scale.model import build_model
    sets = [f"model.residual={kind}", f"model.num_layers={depth}", f"train.seed={seed}",
            f"monitor.probe_batch_size={batch}", f"monitor.probe_seq_len={seq}"]
    if init == "unscaled":
        sets.append("model.depth_scaled_init=false")
    if alpha is not None:
        sets.append(f"model.mgt.alpha_init={alpha}")
    cfg = load_config(base, sets)
    model = build_model(cfg.model, seed=seed)
    if init == "torch_default":
        torch.manual_seed(seed)
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.reset_parameters()
    return cfg, model


def measure(cfg, model, tokens=None) -> dict:
    """Last-layer and minimum geometry of `model` on `tokens` (default: the config's probe batch), moved to
    the model's device (bench/gpu_pilot.py probes on the GPU)."""
    from mgt_scale.monitor.probe import probe_geometry
    from mgt_scale.train.monitor_callback import probe_tokens
    if tokens is None:
        tokens = probe_tokens(cfg, cfg.model.vocab_size)
    tokens = tokens.to(next(model.parameters()).device)
    layers = probe_geometry(model, tokens, 0, float64=True)["layers"]
    fin = lambda v: v is not None and math.isfinite(v)
    raw = [l["eff_rank_norm_raw"] for l in layers]
    cen = [l["eff_rank_norm_centred"] for l in layers]
    rho = [l["centred_energy"] for l in layers]
    defined = [c for c in cen if fin(c)]
    i_raw = min(range(len(raw)), key=lambda i: raw[i])
    i_rho = min(range(len(rho)), key=lambda i: rho[i])
    return {"probe_tokens": int(tokens.numel()), "raw_last": raw[-1], "centred_last": cen[-1] if fin(cen[-1]) else "",
            "rho_last": rho[-1], "raw_min": raw[i_raw], "raw_min_layer": i_raw,
            "centred_min": min(defined) if defined else "", "rho_min": rho[i_rho], "rho_min_layer": i_rho,
            "undefined_layers": len(cen) - len(defined)}


def fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="configs/experiments/base_lm.yaml")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--depths", nargs="+", type=int, default=[12, 48, 100, 200])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.1])
    ap.add_argument("--probe-batch", type=int, default=32)
    ap.add_argument("--probe-seq", type=int, default=128, help="tokens per sequence (not the width: 64)")
    ap.add_argument("--out", default="docs/data/init_factorial.csv")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.is_file():
        with open(out, newline="") as f:
            done = {(r["residual"], r["depth"], r["seed"], r["init"], r["alpha_init"]) for r in csv.DictReader(f)}
    new_file = not out.is_file()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            w.writeheader()
        for depth in args.depths:
            for kind in args.kinds:
                alphas = args.alphas if kind in ("ddl", "mgt") else [None]
                for init in args.inits:
                    for alpha in alphas:
                        for seed in args.seeds:
                            key = (kind, str(depth), str(seed), init, "" if alpha is None else fmt(float(alpha)))
                            if key in done:
                                continue
                            tic = time.perf_counter()
                            cfg, model = build(args.base, kind, depth, seed, init, alpha, args.probe_batch, args.probe_seq)
                            row = measure(cfg, model)
                            row.update(residual=kind, depth=depth, seed=seed, init=init, alpha_init=key[4],
                                       seconds=time.perf_counter() - tic)
                            w.writerow({k: fmt(row[k]) for k in FIELDS})
                            f.flush()
                            print(f"{kind} L={depth} seed={seed} {init} alpha={key[4] or '-'}: raw last {row['raw_last']:.3f} "
                                  f"centred last {row['centred_last'] if row['centred_last'] == '' else round(row['centred_last'], 3)} "
                                  f"rho last {row['rho_last']:.2e} ({row['seconds']:.1f}s)", flush=True)
    return 0


def table(path: str = "docs/data/init_factorial.csv") -> str:
    """Markdown: last-layer raw rank, centred rank and rho, mean +- sd over seeds, per kind x alpha x init
    (rows) and depth (columns). A centred rank that is undefined in any seed is shown as 'undef (k/n)'."""
    import statistics as st
    rows = list(csv.DictReader(open(path, newline="")))
    depths = sorted({int(r["depth"]) for r in rows})
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["residual"], r["alpha_init"], r["init"]), {}).setdefault(int(r["depth"]), []).append(r)
    ms = lambda v, p: f"{st.mean(v):.{p}f} +- {st.stdev(v):.{p}f}" if len(v) > 1 else f"{v[0]:.{p}f}"
    out = ["| kind | alpha | init | " + " | ".join(f"L={d}: raw / centred / rho" for d in depths) + " |",
           "|---|---|---|" + "---|" * len(depths)]
    order = {k: i for i, k in enumerate(KINDS)}
    for (kind, alpha, init) in sorted(groups, key=lambda g: (order.get(g[0], 9), g[1], INITS.index(g[2]))):
        cells = []
        for d in depths:
            rs = groups[(kind, alpha, init)].get(d)
            if not rs:
                cells.append("not run")
                continue
            raw = [float(r["raw_last"]) for r in rs]
            cen = [float(r["centred_last"]) for r in rs if r["centred_last"] != ""]
            rho = [float(r["rho_last"]) for r in rs]
            c = ms(cen, 3) if len(cen) == len(rs) else f"undef ({len(rs) - len(cen)}/{len(rs)})"
            cells.append(f"{ms(raw, 3)} / {c} / {st.mean(rho):.2g}")
        out.append(f"| {kind} | {alpha or '-'} | {init} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
