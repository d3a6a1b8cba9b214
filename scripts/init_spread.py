#!/usr/bin/env python
# Spread of MGT's gate and beta at initialisation: runs a freshly built model on the monitor's probe
# batch and reports, per residual sublayer and pooled, the variance of the gate's pre-activation
# X @ W_gate (to compare with LayerNorm's eps), the gate's and beta's mean and std over all entries.
# Usage: python scripts/init_spread.py --config CFG [--set k=v ...] [--json OUT]
"""Why: with W_gate, W_beta ~ N(0, 1e-3) the gate's pre-activation has a variance far below the
LayerNorm eps (1e-5), so LN does not rescale it and the gate sits at 0.5; beta sits at tanh(b_beta).
This script measures that spread for any init (docs/RESULTS.md, "Corrections", finding 4)."""
from __future__ import annotations

import argparse
import json
import sys

import torch


def spread(cfg, seed: int | None = None) -> dict:
    from mgt_scale.model import build_model
    from mgt_scale.train.monitor_callback import probe_tokens
    model = build_model(cfg.model, seed=cfg.train.seed if seed is None else seed)
    tokens = probe_tokens(cfg, cfg.model.vocab_size)
    pre_var, gates, betas, rows = [], [], [], []

    def make_sink(block: int, kind: str):
        def sink(op, cap):
            row = {"block": block, "kind": kind}
            x = cap["x"].to(torch.float64)
            if cap.get("gate") is not None:
                w = op.gate_beta_up[: op.gate_rows] @ op.gate_beta_down if op.proj_rank else op.gate_beta[: op.gate_rows]
                z = x @ w.to(torch.float64).T
                pre_var.append(z.var(dim=-1).mean().item())  # per-token variance, as LayerNorm sees it
                g = cap["gate"].to(torch.float64)
                gates.append(g.reshape(-1))
                row.update(gate_pre_var=pre_var[-1], gate_mean=g.mean().item(), gate_std=g.std().item())
            if cap.get("beta") is not None:
                b = cap["beta"].to(torch.float64)
                betas.append(b.reshape(-1))
                row.update(beta_mean=b.mean().item(), beta_std=b.std().item())
            rows.append(row)
        return sink

    for i, blk in enumerate(model.blocks):
        for kind in ("attn", "ffn"):
            getattr(blk, f"{kind}_res").stats_sink = make_sink(i, kind)
    model.eval()
    with torch.no_grad():
        model(tokens)
    out = {"residual": cfg.model.residual, "num_layers": cfg.model.num_layers, "d_model": cfg.model.d_model,
           "proj_init": cfg.model.mgt.proj_init,
           "gate_init_std": cfg.model.mgt.gate_init_std, "beta_init_std": cfg.model.mgt.beta_init_std,
           "norm_eps": cfg.model.norm_eps, "sublayers": rows}
    if gates:
        g = torch.cat(gates)
        out.update(gate_pre_var_mean=sum(pre_var) / len(pre_var), gate_mean=g.mean().item(), gate_std=g.std().item())
    if betas:
        b = torch.cat(betas)
        out.update(beta_mean=b.mean().item(), beta_std=b.std().item(),
                   beta_std_within_sublayer=sum(r["beta_std"] for r in rows) / len(rows))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    from mgt_scale.config import ConfigError, load_config
    from mgt_scale.exit_codes import CONFIG_ERROR
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR
    out = spread(cfg, args.seed)
    summary = {k: v for k, v in out.items() if k != "sublayers"}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
