# `mgt export RUN_DIR|CKPT_DIR --output DIR [--dtype fp32|bf16]`: a consolidated, DeepSpeed-free copy
# of a checkpoint's weights: model.safetensors (canonical names `embed.*`, `blocks.{i}.*`, `head.*`),
# config.yaml (the run's resolved config) and tokenizer.model (copied from the data directory when it
# has one). `--format hf` writes a transformers directory instead (mgt_scale/hf/export_hf.py).
# `load_exported(DIR)` rebuilds the model with mgt_scale.model alone. Bad input (no checkpoint
# at the path, a damaged one) exits 2 (CONFIG_ERROR).
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

# the offline consolidation lives in model_source (which `--format hf` reaches through hf.export_hf): no cycle
from mgt_scale.train.model_source import (ExportError, checkpoint_config, consolidated_from_checkpoint,  # noqa: F401
                                          resolve_checkpoint)

WEIGHTS = "model.safetensors"


def export(src: str | Path, output: str | Path, dtype: str = "fp32", log=print) -> Path:
    from safetensors.torch import save_file
    from mgt_scale.config import save_config
    from mgt_scale.model import build_model
    tag_dir = resolve_checkpoint(src)
    cfg, _ = checkpoint_config(tag_dir)
    sd = consolidated_from_checkpoint(tag_dir, cfg)
    model = build_model(cfg.model, seed=0)
    # loading through the model also converts the older layout (one key per residual vector, mgt-scale
    # 0.1) to today's, so exports are always in the current layout
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ExportError(f"{tag_dir}: weights do not match the model of its config: {e}") from None
    missing = [k for k in result.missing_keys if not (cfg.model.tie_embeddings and k == "head.proj.weight")]
    if missing or result.unexpected_keys:
        raise ExportError(f"{tag_dir}: weights do not match the model of its config: missing {missing[:5]}, "
                          f"unknown {result.unexpected_keys[:5]}")
    sd = dict(model.state_dict())
    if cfg.model.tie_embeddings:
        sd.pop("head.proj.weight", None)
    target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    sd = {k: v.to(target).contiguous() for k, v in sd.items()}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / WEIGHTS), metadata={"source": str(tag_dir), "dtype": dtype, "format": "pt"})
    save_config(cfg, out / "config.yaml")
    tok = Path(cfg.data.path) / "tokenizer.model" if cfg.data.path else None
    if tok is not None and tok.is_file():
        shutil.copy2(tok, out / "tokenizer.model")
    log(f"exported {tag_dir} -> {out} ({len(sd)} tensors, {dtype}"
        f"{', tokenizer' if (out / 'tokenizer.model').is_file() else ', no tokenizer'})")
    return out


def load_exported(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, config) from an export directory: mgt_scale.model + safetensors only."""
    from safetensors.torch import load_file
    from mgt_scale.config import load_config
    from mgt_scale.model import build_model
    p = Path(path)
    cfg = load_config(p / "config.yaml")
    model = build_model(cfg.model, seed=0)
    sd = load_file(str(p / WEIGHTS))
    strict = not cfg.model.tie_embeddings
    result = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=strict)
    if not strict and [k for k in result.missing_keys if k != "head.proj.weight"]:
        raise ExportError(f"{p}: missing weights {result.missing_keys[:5]}")
    return model.to(dtype).eval(), cfg


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
    from mgt_scale.exit_codes import CONFIG_ERROR
    try:
        if args.format == "hf":
            return _export_hf(args)
        export(args.source, args.output, args.dtype)
    except (ExportError, OSError) as e:  # no checkpoint there, a damaged one, an unwritable --output
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR
    return 0


def _export_hf(args) -> int:
    from mgt_scale.exit_codes import CONFIG_ERROR
    from mgt_scale.hf.export_hf import HFExportError, export_hf
    from mgt_scale.train.model_source import SourceError
    try:
        export_hf(args.source, args.output, args.dtype)
    except (SourceError, HFExportError, ImportError) as e:
        hint = " (install the `hf` extra: pip install 'mgt-scale[hf]')" if isinstance(e, ImportError) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
