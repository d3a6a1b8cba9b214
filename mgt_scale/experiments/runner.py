# `mgt experiment SWEEP.yaml`: expands a sweep into cells, measures every cell's geometry at
# initialisation in-process, trains each cell as a normal `mgt train` subprocess (resumable; skipped
# when its status.json says finished), evaluates finished cells on their final checkpoint where the
# trainer does not (copy accuracy; final geometry if no geometry.jsonl), and collects everything
# into <runs_dir>/results.csv, results.md and figures/*.png.
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mgt_scale import exit_codes
from mgt_scale.config import CONFIG_FILE, ConfigError, to_dict
from mgt_scale.experiments import collect as C
from mgt_scale.experiments.sweep import Cell, Sweep, base_config_file, cell_config, load_sweep
from mgt_scale.logs import get_logger
from mgt_scale.train.failure import STATUS_FILE

_log = get_logger(__name__)
log = _log.info  # progress of the sweep (the handlers serialise lines from the cells' threads)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mgt experiment", description=(
        "Run a sweep of training runs (one `mgt train` subprocess per cell) and collect results "
        "into <runs_dir>/results.csv, results.md and figures/. See mgt_scale/experiments/sweep.py "
        "for the sweep YAML format."))
    ap.add_argument("sweep", help="sweep YAML (see configs/experiments/)")
    ap.add_argument("--only", action="append", default=[], metavar="CELL_GLOB",
                    help="run only cells whose name matches this glob (repeatable); collection still "
                         "covers every cell")
    ap.add_argument("--collect-only", action="store_true", help="train and measure nothing; only collect")
    ap.add_argument("--init-only", action="store_true", help="measure geometry at initialisation only "
                    "(same as init_only: true in the sweep)")
    ap.add_argument("--jobs", type=int, default=1, help="cells trained concurrently (default 1)")
    ap.add_argument("--dry-run", action="store_true", help="print the cells and their commands, then exit")
    ap.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    return ap


def train_command(sweep: Sweep, cell: Cell) -> list[str]:
    cmd = ["mgt", "train", "--config", str(base_config_file(sweep))]
    for s in cell.set_args():
        cmd += ["--set", s]
    return cmd + ["--resume", "auto"]


def slurm_hint(sweep: Sweep, cell: Cell) -> str:
    cmd = ["mgt", "slurm", "submit", "--config", str(base_config_file(sweep))]
    for s in cell.set_args():
        cmd += ["--set", s]
    cmd += ["--nodes", "1", "--tasks-per-node", "1", "--time", "04:00:00"]
    return shlex.join(cmd)


def write_commands(sweep: Sweep, cells: list[Cell]) -> Path:
    """<runs_dir>/commands.sh: every cell's training command (resumable) and its SLURM equivalent."""
    sweep.runs_dir.mkdir(parents=True, exist_ok=True)
    lines = ["#!/usr/bin/env bash", f"# cells of sweep {sweep.name} ({sweep.path}); each line is resumable", ""]
    for c in cells:
        lines.append(f"# {c.name}")
        lines.append(shlex.join(train_command(sweep, c)))
        lines.append(f"#   on SLURM: {slurm_hint(sweep, c)}")
    p = sweep.runs_dir / "commands.sh"
    p.write_text("\n".join(lines) + "\n")
    return p


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    from mgt_scale.monitor.loggers import json_safe
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj)))
    tmp.replace(path)


def measure_init(sweep: Sweep, cell: Cell) -> dict:
    """Geometry at initialisation, cached in <run dir>/init_geometry.json (keyed by the config)."""
    from mgt_scale.config import config_hash
    from mgt_scale.experiments.copy_eval import init_geometry
    cfg = cell_config(sweep, cell)
    run_dir = Path(cfg.run.dir)
    path = run_dir / C.INIT_FILE
    h = config_hash(cfg)
    old = C._read_json(path)
    if old and old.get("config_hash") == h:
        return old
    run_dir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    rec = dict(init_geometry(cfg), config_hash=h)
    _write_json(path, rec)
    if sweep.init_only:  # keep the resolved config with the numbers
        (run_dir / CONFIG_FILE).write_text(__import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))
    last, mn = C.rank_stats(rec)
    log(f"[{cell.name}] init geometry: last-layer eff_rank_norm {last:.3f}, min {mn:.3f} "
        f"({time.perf_counter() - tic:.1f}s)")
    return rec


def train_cell(sweep: Sweep, cell: Cell, threads: int) -> int:
    cfg = cell_config(sweep, cell)
    run_dir = Path(cfg.run.dir)
    st = _status(run_dir)
    if st.get("state") == "finished":
        log(f"[{cell.name}] finished earlier (step {st.get('step')}): skipped")
        return 0
    cmd = [sys.executable, "-m", "mgt_scale.train.entry"] + train_command(sweep, cell)[2:]
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)  # each cell is its own single-process job
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"[{cell.name}] training: {shlex.join(train_command(sweep, cell))}")
    tic = time.perf_counter()
    with open(run_dir / "train.log", "a") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    st = _status(run_dir)
    log(f"[{cell.name}] exit code {code} ({time.perf_counter() - tic:.0f}s), state {st.get('state')}, "
        f"valid_loss {st.get('valid_loss')} (log: {run_dir / 'train.log'})")
    return code


def evaluate_cell(sweep: Sweep, cell: Cell) -> None:
    """Copy accuracy / missing final geometry from the final checkpoint (cached in eval.json)."""
    from mgt_scale.experiments.copy_eval import evaluate_run
    cfg = cell_config(sweep, cell)
    run_dir = Path(cfg.run.dir)
    st = _status(run_dir)
    if st.get("state") != "finished" or (run_dir / C.EVAL_FILE).is_file():
        return
    need_geo = C.last_geometry(run_dir) is None
    try:
        ev = evaluate_run(cfg, run_dir, need_geometry=need_geo)
    except Exception as e:  # evaluation problems must not lose the sweep's other results
        _log.warning(f"[{cell.name}] evaluation failed: {type(e).__name__}: {e}")
        return
    ev["time"] = time.time()
    _write_json(run_dir / C.EVAL_FILE, ev)
    if "copy_acc" in ev:
        log(f"[{cell.name}] copy accuracy {ev['copy_acc']:.4f}")


def collect(sweep: Sweep, figures: bool = True) -> list[dict]:
    """Write <runs_dir>/results.csv, results.md and figures/ from whatever the cells' dirs hold."""
    rows, geo_cells = [], []
    grid_keys = [k for k, _ in sweep.grid]
    for cell in sweep.cells:
        run_dir = sweep.runs_dir / cell.name
        row = C.collect_cell(run_dir, cell.name, cell.seed)
        for k in grid_keys:
            row[k] = cell.get(k)
        rows.append(row)
        geo_cells.append({"row": row, "init": C._read_json(run_dir / C.INIT_FILE),
                          "final": C.final_geometry(run_dir)})
    sweep.runs_dir.mkdir(parents=True, exist_ok=True)
    extra = [k for k in grid_keys if k not in ("model.residual", "model.num_layers")]
    C.write_csv(rows, sweep.runs_dir / "results.csv", extra)
    figs = []
    if figures:
        from mgt_scale.experiments import figures as F
        fdir = sweep.runs_dir / "figures"
        fdir.mkdir(exist_ok=True)
        for fn, args, name in ((F.rank_by_layer, geo_cells, "rank_by_layer.png"),
                               (F.depth_scaling, rows, "depth_scaling.png"),
                               (F.ablation, rows, "ablation.png"),
                               (F.beta_by_depth, geo_cells, "beta_by_depth.png")):
            try:
                p = fn(args, fdir / name)
            except Exception as e:  # a figure must not lose the table
                _log.warning(f"figure {name} failed: {type(e).__name__}: {e}")
                p = None
            if p is not None:
                figs.append(p)
    md = [f"# Sweep `{sweep.name}`", "", f"Sweep file: `{sweep.path}`; base config: "
          f"`{sweep.base_path or 'inline'}`; seeds {list(sweep.seeds)}; "
          f"{'init only' if sweep.init_only else 'trained'}.", ""]
    if sweep.description:
        md += [sweep.description.strip(), ""]
    md += ["rank = normalised effective rank of the residual stream on the monitor's probe batch "
           "(last = output of the last block, min = minimum over layers); train loss = mean of the last "
           f"{C.TRAIN_LOSS_WINDOW} logged steps; ppl = exp(valid loss); beta at the last probe "
           "(mean over sublayers).", "", C.markdown_table(rows, extra), ""]
    syn = C.synergy(rows)
    if syn:
        md += ["## Ablation synergy (valid loss; gain = loss(preln) - loss(X))", "",
               "| L | preln | mhc_gate | ddl | mgt | gain gate | gain ddl | gain mgt | synergy |",
               "|---|---|---|---|---|---|---|---|---|"]
        for s in syn:
            md.append(f"| {int(float(s['depth']))} | {s['valid_loss_preln']:.4f} | {s['valid_loss_mhc_gate']:.4f} | "
                      f"{s['valid_loss_ddl']:.4f} | {s['valid_loss_mgt']:.4f} | {s['gain_mhc_gate']:+.4f} | "
                      f"{s['gain_ddl']:+.4f} | {s['gain_mgt']:+.4f} | {s['synergy']:+.4f} |")
        md.append("")
    if figs:
        md += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figs] + [""]
    (sweep.runs_dir / "results.md").write_text("\n".join(md))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        sweep = load_sweep(args.sweep)
        if args.init_only:
            sweep = Sweep(**{**sweep.__dict__, "init_only": True})
        cells = [c for c in sweep.cells if not args.only or any(fnmatch.fnmatch(c.name, g) for g in args.only)]
        if not cells:
            _log.error(f"no cell of {args.sweep} matches {args.only}")
            return exit_codes.CONFIG_ERROR
        for c in cells:  # validate every cell's config before anything runs
            cell_config(sweep, c)
    except ConfigError as e:
        _log.error(str(e))
        return exit_codes.CONFIG_ERROR
    log(f"sweep {sweep.name}: {len(cells)} of {len(sweep.cells)} cells -> {sweep.runs_dir}"
        f"{' (init only)' if sweep.init_only else ''}")
    if args.dry_run:
        for c in cells:
            print(f"{c.name}: {shlex.join(train_command(sweep, c))}")
        return 0
    failures, no_space_hit = 0, False
    if not args.collect_only:
        cmds = write_commands(sweep, cells)
        if not sweep.init_only:
            log(f"per-cell commands (resumable; SLURM equivalents included): {cmds}\n"
                f"  e.g. {slurm_hint(sweep, cells[0])}")
        for c in cells:
            measure_init(sweep, c)
        if not sweep.init_only:
            jobs = max(1, args.jobs)
            threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0

            no_space = threading.Event()  # a full disk fails every later cell too: start none

            def one(c: Cell) -> int:
                if no_space.is_set():
                    log(f"[{c.name}] not started: a cell ran out of disk space (exit {exit_codes.NO_SPACE})")
                    return exit_codes.NO_SPACE
                code = train_cell(sweep, c, threads)
                if code == exit_codes.NO_SPACE:
                    no_space.set()
                evaluate_cell(sweep, c)
                return code

            if jobs == 1:
                codes = [one(c) for c in cells]
            else:
                with ThreadPoolExecutor(jobs) as ex:
                    codes = list(ex.map(one, cells))
            failures = sum(1 for code in codes if code != 0)
            no_space_hit = exit_codes.NO_SPACE in codes
    else:
        for c in cells:  # collect-only still fills in evaluations of finished cells if missing
            evaluate_cell(sweep, c)
    rows = collect(sweep, figures=not args.no_figures)
    log(f"collected {len(rows)} cells -> {sweep.runs_dir / 'results.csv'}, {sweep.runs_dir / 'results.md'}")
    if failures:
        _log.warning(f"{failures} cell(s) did not finish: rerun the same command to resume them")
        return exit_codes.NO_SPACE if no_space_hit else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
