#!/usr/bin/env python
# Post-hoc geometry of a finished sweep with the mean-centred probe next to the raw one: for every
# finished cell, export its last checkpoint (`mgt export`), load it into the plain model and probe the
# monitor's batch twice (raw and mean-centred, with rho; float64 forward), at init (same seed) and trained.
# Writes <runs_dir>/centred_rank.md and .json. Usage: python scripts/centred_rank.py RUNS_DIR
"""Why: the collapse monitor reads the raw (uncentred) effective rank. Early in LM training the
residual stream grows one large shared direction (the token cosine goes to ~1), which alone drives
the raw rank to ~1/d; the centred rank says whether the token-specific part has collapsed too. The probe
runs in float64 and the centred rank is undefined where the centred energy rho is below 1.2e-4 (what an
fp32 model resolves; mgt_scale.monitor.metrics): an fp32 forward read 0.60 for a post-LN stack whose
float64 centred rank was 0.02 at rho 7e-10."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _summary(layers: list[dict]) -> dict:
    import math
    out = {"cosine_last": layers[-1]["cosine"], "rho_last": layers[-1]["centred_energy"],
           "rho_min": min(l["centred_energy"] for l in layers)}
    for name, key in (("raw", "eff_rank_norm_raw"), ("centred", "eff_rank_norm_centred")):
        ranks = [l[key] for l in layers]
        finite = [r for r in ranks if math.isfinite(r)]
        out[name] = {"last": ranks[-1], "min": min(finite) if finite else math.nan}
    return out


def probe_both(cfg, model) -> dict:
    """One forward over the monitor's probe batch; its residual states read raw and mean-centred.

    A multi-stream model (`mhc`, n streams of width d) carries [tokens, n*d] states, whose rank is normalised
    by min(tokens, n*d): not comparable with a width-d stream. Its summary reads the sum of the n streams
    at every layer instead (width d, the state the head reads after the last block), and keeps the widened
    state's reading under "streams"."""
    from mgt_scale.model.residual_baselines import num_streams, reduce_streams
    from mgt_scale.monitor.metrics import centred_energy_threshold, layer_geometry
    from mgt_scale.monitor.probe import capture_hidden_states, float64_copy
    from mgt_scale.train.monitor_callback import probe_tokens
    # one float64 forward (as mgt_scale.monitor.probe.probe_geometry); the centred rank is NaN where rho is
    # below what the fp32 model itself resolves
    thr = centred_energy_threshold(next(iter(model.parameters())).dtype)
    hiddens = capture_hidden_states(float64_copy(model), probe_tokens(cfg, cfg.model.vocab_size))
    n = num_streams(cfg.model)
    out = _summary(layer_geometry([reduce_streams(h, n) for h in hiddens], min_centred_energy=thr))
    if n > 1:
        out["streams"] = _summary(layer_geometry(hiddens, min_centred_energy=thr))
    return out


def cell_geometry(run_dir: Path) -> dict | None:
    from mgt_scale.config import load_config
    from mgt_scale.model import build_model
    from mgt_scale.train.export import load_weights
    from mgt_scale.train.failure import STATUS_FILE
    status = json.loads((run_dir / STATUS_FILE).read_text()) if (run_dir / STATUS_FILE).is_file() else {}
    if status.get("state") != "finished":
        return None
    cfg = load_config(str(run_dir / "config.yaml"))
    init = probe_both(cfg, build_model(cfg.model, seed=cfg.train.seed))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "mgt_scale.cli", "export", str(run_dir), "--output", tmp],
                       check=True, capture_output=True, text=True)
        model = build_model(cfg.model, seed=cfg.train.seed)
        load_weights(model, tmp)
    trained = probe_both(cfg, model)
    return {"cell": run_dir.name, "residual": cfg.model.residual, "depth": cfg.model.num_layers,
            "init": init, "trained": trained}


def render(runs: Path, rows: list[dict]) -> None:
    lines = ["| cell | residual | L | init raw last | init centred last | trained raw last | trained centred last "
             "| trained rho last | trained centred min | trained token cosine (last) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "undefined" if v != v else f"{v:.4f}"  # NaN: rho below the fp32 threshold
    for r in rows:
        i, t = r["init"], r["trained"]
        lines.append(f"| {r['cell']} | {r['residual']} | {r['depth']} | {i['raw']['last']:.4f} | "
                     f"{f(i['centred']['last'])} | {t['raw']['last']:.4f} | {f(t['centred']['last'])} | "
                     f"{t['rho_last']:.3g} | {f(t['centred']['min'])} | {t['cosine_last']:.4f} |")
    (runs / "centred_rank.md").write_text(
        f"# Raw vs mean-centred normalised effective rank: {runs}\n\n"
        f"Command: `python scripts/centred_rank.py {runs}`; probe = the monitor's batch (validation split).\n\n"
        + "\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        from mgt_scale.exit_codes import CONFIG_ERROR
        print(__doc__ or "", "\nusage: python scripts/centred_rank.py RUNS_DIR", file=sys.stderr)
        return CONFIG_ERROR
    runs = Path(argv[0])
    rows = []
    for run_dir in sorted(p for p in runs.iterdir() if (p / "config.yaml").is_file()):
        row = cell_geometry(run_dir)
        if row is None:
            print(f"{run_dir.name}: not finished, skipped", flush=True)
            continue
        rows.append(row)
        print(f"{row['cell']}: trained raw {row['trained']['raw']['last']:.4f} "
              f"centred {row['trained']['centred']['last']:.4f} rho {row['trained']['rho_last']:.3g}", flush=True)
    rows.sort(key=lambda r: (r["residual"], r["depth"], r["cell"]))
    from mgt_scale.monitor.loggers import json_safe  # NaN (undefined) -> null
    (runs / "centred_rank.json").write_text(json.dumps(json_safe(rows), indent=1))
    render(runs, rows)
    print(f"wrote {runs / 'centred_rank.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
