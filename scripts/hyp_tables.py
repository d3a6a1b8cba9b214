#!/usr/bin/env python
# Tables of issue #33's trained sweeps (hyp_lr, hyp_main) from their run folders: one compact CSV row per
# finished cell (docs/data/, so the tables rebuild from the repository) and the markdown tables of
# docs/RESULTS.md. Usage:
#   python scripts/hyp_tables.py csv RUNS_DIR OUT.csv    # per cell: lr, seed, losses, float64 geometry
#   python scripts/hyp_tables.py lr OUT.csv              # valid loss per kind x depth x lr (seed mean)
#   python scripts/hyp_tables.py main OUT.csv            # mean +- sd over seeds per kind x depth
#   python scripts/hyp_tables.py copy OUT.csv            # copy task: accuracy, copied-half loss, steps to learn
#   python scripts/hyp_tables.py variants CSV... [--match=GLOB]...  # ablation/sensitivity: per cell variant
"""The geometry columns come from scripts/centred_rank.py's centred_rank.json (float64 forward of the
exported last checkpoint on the monitor's probe batch); a centred rank is "nan" where rho is below the
fp32 threshold (undefined) and a cell without geometry has empty geometry columns. The loss columns come from each cell's metrics.jsonl (valid_loss of the last
evaluation; train loss = mgt experiment's results.csv's: the mean of the last 5 logged steps' losses).
Copy-task cells (data.synthetic: copy) add the runner's eval.json (copy accuracy and copied-half loss of
the final checkpoint on held-out batches) and the first logged step whose training loss is below
SOLVED_LOSS nats ("" if never), the column that separates kinds once they all end up copying."""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

FIELDS = ["cell", "residual", "depth", "lr", "seed", "steps", "valid_loss", "train_loss", "probe_tokens",
          "raw_last", "centred_last", "rho_last", "raw_min", "centred_min", "cosine_last", "init_raw_last"]
COPY_FIELDS = ["copy_acc", "copy_loss", "solved_step"]
SOLVED_LOSS = 0.1  # nats on the copied half: the model puts about 90 % on the right token
KIND_ORDER = ("preln", "postln", "deepnorm", "mgt", "mhc", "ddl_delta")


def cell_row(run_dir: Path, geometry: dict | None) -> dict | None:
    import yaml
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
    if status.get("state") != "finished":
        return None
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    from mgt_scale.experiments.collect import final_train_loss  # the same window as results.csv
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [r for r in records if "valid_loss" in r]
    row = {"cell": run_dir.name, "residual": cfg["model"]["residual"], "depth": cfg["model"]["num_layers"],
           "lr": cfg["train"]["lr"], "seed": cfg["train"]["seed"], "steps": cfg["train"]["max_steps"],
           "valid_loss": valid[-1]["valid_loss"] if valid else "", "train_loss": final_train_loss(run_dir),
           "probe_tokens": cfg["monitor"]["probe_batch_size"] * cfg["monitor"]["probe_seq_len"]}
    if cfg.get("data", {}).get("synthetic") == "copy":
        ev_file = run_dir / "eval.json"
        ev = json.loads(ev_file.read_text()) if ev_file.is_file() else {}
        solved = [r["step"] for r in records if "loss" in r and r["loss"] < SOLVED_LOSS]
        row.update(copy_acc=ev.get("copy_acc"), copy_loss=ev.get("copy_loss"),
                   solved_step=solved[0] if solved else None)
    if geometry:
        t = geometry["trained"]
        undefined = lambda v: math.nan if v is None else v  # centred rank below the rho threshold: "nan"
        row.update(raw_last=t["raw"]["last"], centred_last=undefined(t["centred"]["last"]), rho_last=t["rho_last"],
                   raw_min=t["raw"]["min"], centred_min=undefined(t["centred"]["min"]), cosine_last=t["cosine_last"],
                   init_raw_last=geometry["init"]["raw"]["last"])
    return row


def write_csv(runs: Path, out: Path) -> int:
    geo_file = runs / "centred_rank.json"
    geometry = {g["cell"]: g for g in json.loads(geo_file.read_text())} if geo_file.is_file() else {}
    rows = [r for d in sorted(runs.iterdir()) if (d / "config.yaml").is_file()
            for r in [cell_row(d, geometry.get(d.name))] if r is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = FIELDS + (COPY_FIELDS if any("copy_acc" in r for r in rows) else [])
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                        for k, v in r.items()})
    print(f"wrote {out}: {len(rows)} finished cells")
    return 0


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _f(v: str) -> float | None:
    """A CSV cell: None where not measured (empty), NaN where undefined ("nan")."""
    return float(v) if v not in ("", None) else None


def _kinds(rows: list[dict]) -> list[str]:
    present = {r["residual"] for r in rows}
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def lr_table(path: Path) -> int:
    rows = read(path)
    lrs = sorted({float(r["lr"]) for r in rows})
    by: dict[tuple[str, int, float], list[float]] = defaultdict(list)  # mean over seeds where there are several
    for r in rows:
        by[(r["residual"], int(r["depth"]), float(r["lr"]))].append(_f(r["valid_loss"]))
    print("| kind | L | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |")
    print("|---|---|" + "---:|" * len(lrs) + "---|")
    for kind in _kinds(rows):
        for depth in sorted({int(r["depth"]) for r in rows if r["residual"] == kind}):
            cells = {lr: statistics.fmean(v for v in by[(kind, depth, lr)] if v is not None)
                     if any(v is not None for v in by.get((kind, depth, lr), [])) else math.nan
                     for lr in lrs}
            done = {lr: v for lr, v in cells.items() if math.isfinite(v)}
            best = min(done, key=done.get) if done else None
            text = [("**%.3f**" if lr == best else "%.3f") % v if math.isfinite(v) else "-"
                    for lr, v in cells.items()]
            best_text = f"{best:g}" if best is not None else "-"
            print(f"| {kind} | {depth} | " + " | ".join(text) + f" | {best_text} |")
    return 0


def _ms(vals: list[float | None], fmt: str) -> str:
    measured = [v for v in vals if v is not None]
    vals = [v for v in measured if math.isfinite(v)]
    if not vals:
        return "undefined" if measured else "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return (fmt % statistics.fmean(vals)) + " +- " + (fmt % sd if math.isfinite(sd) else "n/a")


def _by_kind_and_depth(path: Path):
    """(kind, depth, that group's rows sorted by seed), kinds in KIND_ORDER, depths ascending."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in read(path):
        groups[(r["residual"], int(r["depth"]))].append(r)
    for kind in _kinds([r for rs in groups.values() for r in rs]):
        for depth in sorted(d for k, d in groups if k == kind):
            yield kind, depth, sorted(groups[(kind, depth)], key=lambda r: int(r["seed"]))


MAIN_HEADER = ("| valid loss | train loss | raw rank (last) | centred rank (last) | rho (last) "
               "| raw rank (min layer) |", "|---|---|---|---|---|---|")


def _main_columns(rs: list[dict]) -> str:
    """The mean +- sd columns of MAIN_HEADER over one group's rows (its seeds)."""
    col = lambda key: [_f(r[key]) for r in rs]
    rho = [v for v in col("rho_last") if v is not None]
    rho_text = f"{min(rho):.2g}-{max(rho):.2g}" if rho else "-"
    return (f"{_ms(col('valid_loss'), '%.3f')} | {_ms(col('train_loss'), '%.3f')} | {_ms(col('raw_last'), '%.3f')} | "
            f"{_ms(col('centred_last'), '%.3f')} | {rho_text} | {_ms(col('raw_min'), '%.3f')} |")


def main_table(path: Path) -> int:
    print("| kind | L | lr | seeds " + MAIN_HEADER[0])
    print("|---|---|---|---" + MAIN_HEADER[1])
    for kind, depth, rs in _by_kind_and_depth(path):
        print(f"| {kind} | {depth} | {', '.join(sorted({r['lr'] for r in rs}))} | {len(rs)} | {_main_columns(rs)}")
    return 0


def variants_table(args: list[str]) -> int:
    """Ablation / sensitivity: one row per variant (a cell's name without its `__seed-N`), over the rows of
    one or more CSVs (the first column says which: a variant shared with another sweep, e.g. hyp_main's
    mgt-L48 as the sensitivity sweep's reference, is read from that sweep's cells, not rerun); `--match
    GLOB` (repeatable) keeps the variants it matches, in the order of the first glob each matches."""
    import fnmatch
    paths = [Path(a) for a in args if not a.startswith("--match=")]
    globs = [a.split("=", 1)[1] for a in args if a.startswith("--match=")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        from mgt_scale.exit_codes import CONFIG_ERROR
        print(f"hyp_tables.py variants: no such CSV: {', '.join(missing)}", file=sys.stderr)
        return CONFIG_ERROR
    groups: dict[tuple[int, str, str], list[dict]] = defaultdict(list)  # (first matching glob, variant, sweep)
    for path in paths:
        for r in read(path):
            variant = r["cell"].rsplit("__seed-", 1)[0]
            first = next((i for i, g in enumerate(globs) if fnmatch.fnmatchcase(variant, g)), None) if globs else 0
            if first is not None:
                groups[(first, variant, path.stem)].append(r)
    print("| sweep | variant | kind | L | lr | seeds " + MAIN_HEADER[0])
    print("|---|---|---|---|---|---" + MAIN_HEADER[1])
    for (_, variant, source), rs in sorted(groups.items()):
        kinds = ", ".join(sorted({r["residual"] for r in rs}))
        depths = ", ".join(sorted({r["depth"] for r in rs}))
        print(f"| {source} | {variant} | {kinds} | {depths} | {', '.join(sorted({r['lr'] for r in rs}))} | "
              f"{len(rs)} | {_main_columns(rs)}")
    return 0


def copy_table(path: Path) -> int:
    print(f"| kind | L | lr | seeds | copy accuracy | copied-half valid loss | step train loss < {SOLVED_LOSS:g} "
          "(per seed) | raw rank (last) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, depth, rs in _by_kind_and_depth(path):
        col = lambda key: [_f(r[key]) for r in rs]
        solved = " / ".join(r["solved_step"] or "never" for r in rs)
        print(f"| {kind} | {depth} | {', '.join(sorted({r['lr'] for r in rs}))} | {len(rs)} | "
              f"{_ms(col('copy_acc'), '%.3f')} | {_ms(col('copy_loss'), '%.2g')} | {solved} | "
              f"{_ms(col('raw_last'), '%.3f')} |")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "csv":
        return write_csv(Path(argv[1]), Path(argv[2]))
    tables = {"lr": lr_table, "main": main_table, "copy": copy_table}
    if len(argv) == 2 and argv[0] in tables:
        return tables[argv[0]](Path(argv[1]))
    if len(argv) >= 2 and argv[0] == "variants" and any(not a.startswith("--match=") for a in argv[1:]):
        return variants_table(argv[1:])
    from mgt_scale.exit_codes import CONFIG_ERROR
    print(__doc__, "\nusage: hyp_tables.py csv RUNS_DIR OUT.csv | lr|main|copy OUT.csv "
          "| variants CSV... [--match=GLOB]...", file=sys.stderr)
    return CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
