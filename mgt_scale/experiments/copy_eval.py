# Post-hoc evaluation of a run without a DeepSpeed engine: rebuild the plain torch model, load the
# final checkpoint's weights (ZeRO shards consolidated with DeepSpeed's zero_to_fp32), then measure
# copy-task accuracy, validation loss, or geometry. Also the geometry at initialisation.
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mgt_scale.config import Config
from mgt_scale.data.synthetic import copy_task_mask
from mgt_scale.model import build_model, lm_loss
from mgt_scale.checkpoint.manifest import LATEST


def init_geometry(cfg: Config) -> dict[str, Any]:
    """Geometry record (see mgt_scale.monitor.loggers) of the freshly initialised model exactly as
    the trainer builds it (build_model(cfg.model, seed=cfg.train.seed)), on the monitor's fixed probe
    batch, forward pass in float64. Deterministic: same config -> same numbers."""
    from mgt_scale.monitor.probe import probe_geometry
    from mgt_scale.train.monitor_callback import probe_tokens
    model = build_model(cfg.model, seed=cfg.train.seed)
    tokens = probe_tokens(cfg, cfg.model.vocab_size)
    return probe_geometry(model, tokens, 0, center=cfg.monitor.geometry_center, float64=True)


def final_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint directory `latest_good` points to (else the newest step_* directory)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return None
    latest = ck / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ck / tag).is_dir():
            return ck / tag
    tags = sorted(p for p in ck.iterdir() if p.is_dir() and p.name.startswith("step_"))
    return tags[-1] if tags else None


def load_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a zero3-mode checkpoint (any ZeRO stage), keys as in MGTModel.state_dict()."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_trained_model(cfg: Config, run_dir: str | Path) -> torch.nn.Module | None:
    tag_dir = final_checkpoint(run_dir)
    if tag_dir is None:
        return None
    model = build_model(cfg.model, seed=cfg.train.seed)
    sd = load_state_dict(tag_dir)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "head.proj.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{tag_dir}: checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.eval()
    return model


@torch.no_grad()
def copy_accuracy(model: torch.nn.Module, batches) -> float:
    """Token accuracy of argmax predictions on the copied half (copy_task_mask) of the batches."""
    model.eval()
    correct, total = 0, 0
    for x, y in batches:
        pred = model(x).argmax(-1)
        m = copy_task_mask(y)
        correct += int(((pred == y) & m).sum())
        total += int(m.sum())
    return correct / max(total, 1)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches, mask_fn=None) -> float:
    model.eval()
    losses = [float(lm_loss(model(x), y, mask_fn(y) if mask_fn else None)) for x, y in batches]
    return sum(losses) / len(losses) if losses else math.nan


def evaluate_run(cfg: Config, run_dir: str | Path, need_geometry: bool) -> dict[str, Any]:
    """What the runner measures on the final checkpoint: copy accuracy (copy task) and, when the run
    has no geometry.jsonl, the final geometry record. {} when there is no checkpoint."""
    needs_copy = cfg.data.synthetic == "copy"
    if not needs_copy and not need_geometry:
        return {}
    model = load_trained_model(cfg, run_dir)
    if model is None:
        return {}
    out: dict[str, Any] = {}
    if needs_copy:
        from mgt_scale.data import build_valid_batches
        batches = build_valid_batches(cfg.data, cfg.data.seq_len, 16, 4, cfg.model.vocab_size)
        out["copy_acc"] = copy_accuracy(model, batches)
        out["copy_loss"] = eval_loss(model, batches, copy_task_mask)
    if need_geometry:
        from mgt_scale.monitor.probe import probe_geometry
        from mgt_scale.train.monitor_callback import probe_tokens
        out["final_geometry"] = probe_geometry(model, probe_tokens(cfg, cfg.model.vocab_size), cfg.train.max_steps,
                                               center=cfg.monitor.geometry_center, float64=True)
    return out
