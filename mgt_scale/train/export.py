# The library behind `mgt export` (mgt_scale/commands/export.py) and `mgt generate`: a consolidated,
# DeepSpeed-free copy of a checkpoint's weights: model.safetensors (canonical names `embed.*`, `blocks.{i}.*`, `head.*`),
# config.yaml (the run's resolved config) and tokenizer.model (copied from the data directory when it
# has one). `--format hf` writes a transformers directory instead (mgt_scale/hf/export_hf.py).
# `consolidated_from_checkpoint` gathers a sharded checkpoint into one state dict in memory;
# `load_exported(DIR)` rebuilds the model with mgt_scale.model alone. Bad input (no checkpoint at the
# path, a damaged one) raises ExportError.
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mgt_scale.config.loading import CONFIG_FILE
from mgt_scale.data.shards import TOKENIZER_FILE
from mgt_scale.logs import get_logger

# the offline consolidation lives in model_source (which `--format hf` reaches through hf.export_hf): no cycle
from mgt_scale.train.model_source import (WEIGHTS, ExportError, checkpoint_config,  # noqa: F401
                                          consolidated_from_checkpoint, resolve_checkpoint)


def export(src: str | Path, output: str | Path, dtype: str = "fp32", log=None) -> Path:
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
    save_config(cfg, out / CONFIG_FILE)
    tok = Path(cfg.data.path) / TOKENIZER_FILE if cfg.data.path else None
    if tok is not None and tok.is_file():
        shutil.copy2(tok, out / TOKENIZER_FILE)
    (log or get_logger(__name__).info)(f"exported {tag_dir} -> {out} ({len(sd)} tensors, {dtype}"
        f"{', tokenizer' if (out / TOKENIZER_FILE).is_file() else ', no tokenizer'})")
    return out


def load_exported(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, config) from an export directory: mgt_scale.model + safetensors only."""
    from safetensors.torch import load_file
    from mgt_scale.config import load_config
    from mgt_scale.model import build_model
    p = Path(path)
    cfg = load_config(p / CONFIG_FILE)
    model = build_model(cfg.model, seed=0)
    sd = load_file(str(p / WEIGHTS))
    strict = not cfg.model.tie_embeddings
    result = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=strict)
    if not strict and [k for k in result.missing_keys if k != "head.proj.weight"]:
        raise ExportError(f"{p}: missing weights {result.missing_keys[:5]}")
    return model.to(dtype).eval(), cfg


def load_weights(model, path: str) -> None:
    """Load an export's weights (a directory or its model.safetensors) into an already built model
    (scripts/centred_rank.py)."""
    from safetensors.torch import load_file
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint file (export one with `mgt export`)")
    state = load_file(str(p))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{p}: does not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
