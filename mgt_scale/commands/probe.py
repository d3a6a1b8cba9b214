# `mgt probe`: geometry of a freshly initialised (or trained) model without training: a per-layer
# table on screen and, with --json, {"layers": [{"layer", "eff_rank", "eff_rank_norm", ...}, ...]}.
# --checkpoint takes an export, a model.safetensors, a checkpoint directory or a run directory
# (mgt_scale.train.model_source); --config is then optional (default: the config saved with the weights)
# and, when given, is checked against the weights. Bad input exits 2.
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mgt_scale.logs import get_logger

log = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mgt probe", description=__doc__ or "Per-layer geometry of a model.")
    ap.add_argument("--config", default=None, help="model config (optional with a --checkpoint that carries "
                    "its config: an export, checkpoint or run directory)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--checkpoint", default="", help="trained weights: an export dir (`mgt export`), a "
                    "model.safetensors, a checkpoint dir or a run dir (its latest good checkpoint)")
    ap.add_argument("--json", default="", help="write the per-layer metrics to this file")
    ap.add_argument("--seed", type=int, default=None, help="init seed (default: train.seed)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mgt_scale.config import ConfigError, load_config
    from mgt_scale.exit_codes import CONFIG_ERROR
    from mgt_scale.train.model_source import SourceError, open_model
    if args.config is None and not args.checkpoint:
        log.error("pass --config FILE (a fresh model) or --checkpoint PATH (trained weights)")
        return CONFIG_ERROR
    try:
        if args.checkpoint:
            src = open_model(args.checkpoint, args.config, args.overrides)
            model, cfg = src.model, src.cfg
        else:
            from mgt_scale.model import build_model
            cfg = load_config(args.config, args.overrides)
            model = build_model(cfg.model, seed=cfg.train.seed if args.seed is None else args.seed)
    except (ConfigError, SourceError) as e:
        log.error(str(e))
        return CONFIG_ERROR
    import torch
    from mgt_scale.monitor.metrics import centred_energy_threshold
    from mgt_scale.monitor.probe import probe_geometry
    from mgt_scale.train.monitor_callback import probe_tokens
    try:
        tokens = probe_tokens(cfg, cfg.model.vocab_size)
    except (OSError, ValueError) as e:
        log.error(str(e))
        return CONFIG_ERROR
    with torch.no_grad():
        geo = probe_geometry(model, tokens, step=0, center=cfg.monitor.geometry_center, float64=True)
    print(f"{cfg.model.residual}, {cfg.model.num_layers} layers, d={cfg.model.d_model}; probe "
          f"{tuple(tokens.shape)}, float64 forward; layer i = input of block i, last = final block output; "
          f"rho = centred energy, centred rank undefined (-) where rho < {centred_energy_threshold(torch.float32):.2g}")
    print(f"{'layer':>5} {'eff_rank':>9} {'norm':>7} {'raw':>7} {'centred':>7} {'rho':>9} {'stable':>8} {'cosine':>7} "
          f"{'rank1_res':>9} {'|x|':>9}")
    for l in geo["layers"]:
        c = l["eff_rank_norm_centred"]
        c = f"{c:>7.4f}" if math.isfinite(c) else f"{'-':>7}"
        print(f"{l['layer']:>5} {l['eff_rank']:>9.3f} {l['eff_rank_norm']:>7.4f} {l['eff_rank_norm_raw']:>7.4f} {c} "
              f"{l['centred_energy']:>9.3g} {l['stable_rank']:>8.3f} {l['cosine']:>7.4f} {l['rank1_residual']:>9.4f} "
              f"{l['norm']:>9.3f}")
    if args.json:
        out = {"residual": cfg.model.residual, "num_layers": cfg.model.num_layers, "layers": geo["layers"],
               "ops": geo.get("ops", [])}
        from mgt_scale.monitor.loggers import json_safe  # NaN (undefined centred rank) -> null
        Path(args.json).write_text(json.dumps(json_safe(out), indent=1, allow_nan=False))
    return 0
