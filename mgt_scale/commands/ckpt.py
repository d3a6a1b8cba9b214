# `mgt ckpt`: inspect and repair checkpoints without starting a run.
#   mgt ckpt list RUN_DIR            every checkpoint with its status (good / incomplete / damaged)
#   mgt ckpt verify CKPT_DIR|RUN_DIR sha256 of every file against the manifest; exit 2 if bad or none
#   mgt ckpt reshard RUN_DIR [--tag step_XXXXXXXX]
#                                    convert a zero3 (or pipeline ZeRO-1) checkpoint to DeepSpeed's universal format so that
#                                    `mgt train --resume auto` continues it on another number of ranks
# Bad input (no checkpoint at the path, a damaged one, no latest_good to reshard) exits 2 (mgt_scale.exit_codes.CONFIG_ERROR).
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mgt_scale.exit_codes import CONFIG_ERROR, CRASH
from mgt_scale.logs import get_logger
from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, TAG_RE, CheckpointError, verify_checkpoint
from mgt_scale.checkpoint.listing import list_checkpoints
from mgt_scale.checkpoint.universal import ConversionError, make_universal

log = get_logger(__name__)


def _ckpt_root(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def cmd_list(args) -> int:
    rows = list_checkpoints(args.run_dir, full=not args.quick)
    if not rows:
        log.error(f"{args.run_dir}: no checkpoints")
        return CONFIG_ERROR
    print(f"{'tag':<16} {'status':<11} {'world':>5} {'mode':<9} {'MB':>8}  notes")
    for r in rows:
        notes = []
        if r["latest"]:
            notes.append("latest_good")
        if r["universal"]:
            notes.append("universal copy")
        notes += r["problems"][:3] + ([f"... {len(r['problems']) - 3} more"] if len(r["problems"]) > 3 else [])
        print(f"{r['tag']:<16} {r['status']:<11} {r['world_size'] or '-':>5} {r['mode'] or '-':<9} "
              f"{r['bytes'] / 1e6:>8.2f}  {'; '.join(notes)}")
    return 0


def cmd_verify(args) -> int:
    path = Path(args.path)
    if (path / MANIFEST).is_file() or TAG_RE.match(path.name):
        dirs = [path]
    else:
        root = _ckpt_root(path)
        dirs = sorted(p for p in root.iterdir() if TAG_RE.match(p.name) and p.is_dir()) if root.is_dir() else []
    if not dirs:
        log.error(f"{path}: no checkpoint found")
        return CONFIG_ERROR
    bad = 0
    for d in dirs:
        problems = verify_checkpoint(d, full=True)
        if problems:
            bad += 1
            print(f"{d}: BAD")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"{d}: ok")
    return CONFIG_ERROR if bad else 0


def cmd_reshard(args) -> int:
    root = _ckpt_root(Path(args.run_dir))
    tag = args.tag
    if not tag:
        latest = root / LATEST
        if not latest.is_file():
            log.error(f"{root}: no {LATEST} pointer: pass --tag")
            return CONFIG_ERROR
        tag = latest.read_text().strip()
    try:
        out = make_universal(root / tag, force=args.force)
    except ConversionError as e:  # the converter failed on a good checkpoint: not the operator's input
        log.error(str(e))
        return CRASH
    except CheckpointError as e:  # damaged, or not a checkpoint: bad input
        log.error(str(e))
        return CONFIG_ERROR
    print(f"universal checkpoint: {out}\n`mgt train --resume auto` on any number of ranks now loads it")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mgt ckpt", description="Inspect, verify and reshard checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="list a run's checkpoints with their status")
    p.add_argument("run_dir")
    p.add_argument("--quick", action="store_true", help="check sizes only (no sha256)")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("verify", help="check every file of a checkpoint (or of all a run's checkpoints)")
    p.add_argument("path", help="a checkpoint directory (checkpoints/step_XXXXXXXX) or a run directory")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("reshard", help="convert a zero3 (or pipeline ZeRO-1) checkpoint to DeepSpeed's universal format")
    p.add_argument("run_dir")
    p.add_argument("--tag", default="", help="checkpoint tag (default: the latest good one)")
    p.add_argument("--force", action="store_true", help="redo an existing conversion")
    p.set_defaults(fn=cmd_reshard)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
