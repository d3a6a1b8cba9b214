# `mgt export RUN_DIR|CKPT_DIR --output DIR [--dtype fp32|bf16] [--format mgt|hf]`: a consolidated,
# DeepSpeed-free copy of a checkpoint's weights (mgt_scale/train/export.py), or with `--format hf` a
# transformers directory (mgt_scale/hf/export_hf.py). Bad input (no checkpoint at the path, a damaged
# one, an unwritable --output) exits 2 (CONFIG_ERROR); a write that ran out of disk space or quota exits
# 88 (NO_SPACE) with the line that names the path and the free space (train/failure.py).
from __future__ import annotations

import argparse
import sys

from mgt_scale.exit_codes import CONFIG_ERROR
from mgt_scale.logs import get_logger
from mgt_scale.train.export import ExportError, export

log = get_logger(__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mgt export", description="Write a checkpoint's weights as a consolidated "
                                 "model.safetensors + config.yaml (+ tokenizer.model), loadable without DeepSpeed.")
    ap.add_argument("source", help="a run directory (its latest good checkpoint) or a checkpoint directory")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--format", choices=["mgt", "hf"], default="mgt", help="hf: a directory that transformers "
                    "loads with trust_remote_code (mgt_scale/hf/export_hf.py; needs the `hf` extra); the source "
                    "may then also be an mgt export directory")
    args = ap.parse_args(argv)
    try:
        if args.format == "hf":
            return _export_hf(args)
        export(args.source, args.output, args.dtype)
    except OSError as e:
        return _os_error(e, args.output)
    except ExportError as e:  # no checkpoint there, a damaged one
        log.error(str(e))
        return CONFIG_ERROR
    return 0


def _os_error(e: OSError, output: str) -> int:
    """ENOSPC / EDQUOT (or a write that failed on a full filesystem): NO_SPACE with the path and the free
    space; any other OSError (an unwritable --output) is bad input."""
    from pathlib import Path

    from mgt_scale import exit_codes
    from mgt_scale.train.failure import no_space_message
    cause = no_space_message(e, Path(output), then="export again")
    log.error(cause or str(e))
    return exit_codes.NO_SPACE if cause else CONFIG_ERROR


def _export_hf(args) -> int:
    from mgt_scale.hf.export_hf import HFExportError, export_hf
    from mgt_scale.train.model_source import SourceError
    try:
        export_hf(args.source, args.output, args.dtype)
    except OSError as e:
        return _os_error(e, args.output)
    except (SourceError, HFExportError, ImportError) as e:
        hint = " (install the `hf` extra: pip install 'mgt-scale[hf]')" if isinstance(e, ImportError) else ""
        log.error(f"{e}{hint}")
        return CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
