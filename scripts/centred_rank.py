#!/usr/bin/env python
# Post-hoc geometry of a finished sweep with the mean-centred probe next to the raw one: for every
# finished cell, export its last checkpoint (`mgt export`), load it into the plain model and probe the
# monitor's batch twice (monitor.geometry_center false / true), at init (same seed) and trained.
# Writes <runs_dir>/centred_rank.md and .json. Usage: python scripts/centred_rank.py RUNS_DIR
"""Why: the collapse monitor reads the raw (uncentred) effective rank. Early in LM training the
residual stream grows one large shared direction (the token cosine goes to ~1), which alone drives
the raw rank to ~1/d; the centred rank says whether the token-specific part has collapsed too."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def probe_both(cfg, model) -> dict:
    """One forward over the monitor's probe batch; its residual states read raw and mean-centred."""
    import torch

    from mgt_scale.monitor.metrics import layer_geometry
    from mgt_scale.monitor.probe import capture_hidden_states
    from mgt_scale.train.monitor_callback import probe_tokens
    tokens = probe_tokens(cfg, cfg.model.vocab_size)
    with torch.no_grad():
        hiddens = capture_hidden_states(model, tokens)
    out = {}
    for name, center in (("raw", False), ("centred", True)):
        layers = layer_geometry(hiddens, center=center)
        ranks = [l["eff_rank_norm"] for l in layers]
        out[name] = {"last": ranks[-1], "min": min(ranks)}
        if not center:  # cosine is always on the raw tokens (monitor/metrics.py)
            out["cosine_last"] = layers[-1]["cosine"]
    return out


def cell_geometry(run_dir: Path) -> dict | None:
    from mgt_scale.config import load_config
    from mgt_scale.model import build_model
    from mgt_scale.monitor.probe_cli import load_weights
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
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
             "| trained centred min | trained token cosine (last) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i, t = r["init"], r["trained"]
        lines.append(f"| {r['cell']} | {r['residual']} | {r['depth']} | {i['raw']['last']:.4f} | "
                     f"{i['centred']['last']:.4f} | {t['raw']['last']:.4f} | {t['centred']['last']:.4f} | "
                     f"{t['centred']['min']:.4f} | {t['cosine_last']:.4f} |")
    (runs / "centred_rank.md").write_text(
        f"# Raw vs mean-centred normalised effective rank: {runs}\n\n"
        f"Command: `python scripts/centred_rank.py {runs}`; probe = the monitor's batch (validation split).\n\n"
        + "\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__ or "", "\nusage: python scripts/centred_rank.py RUNS_DIR", file=sys.stderr)
        return 2
    runs = Path(argv[0])
    rows = []
    for run_dir in sorted(p for p in runs.iterdir() if (p / "config.yaml").is_file()):
        row = cell_geometry(run_dir)
        if row is None:
            print(f"{run_dir.name}: not finished, skipped", flush=True)
            continue
        rows.append(row)
        print(f"{row['cell']}: trained raw {row['trained']['raw']['last']:.4f} "
              f"centred {row['trained']['centred']['last']:.4f}", flush=True)
    rows.sort(key=lambda r: (r["residual"], r["depth"], r["cell"]))
    (runs / "centred_rank.json").write_text(json.dumps(rows, indent=1))
    render(runs, rows)
    print(f"wrote {runs / 'centred_rank.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
