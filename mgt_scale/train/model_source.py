# Opening a trained model for `mgt generate` and `mgt probe`: from an export directory (`mgt export`), a
# model.safetensors file, a checkpoint directory or a run directory (its latest good checkpoint). The
# config is the one saved with the weights (export: config.yaml; checkpoint: its resolved config, or the
# run's), or one the user passes, which is checked against the weights tensor by tensor first, so a
# mismatch is one line naming the config file, the tensor and both shapes instead of torch's
# size-mismatch traceback; then, where a config is saved with the weights, its `model` section must
# equal the given one in every key that changes the computed function (same shapes can still be another
# function: model.mgt.beta_input). Checkpoints are consolidated in memory (consolidated_from_checkpoint,
# here so that mgt_scale.train.export, mgt_scale.hf.export_hf and this module import without a cycle):
# nothing is written into the run directory.
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mgt_scale.config.loading import CONFIG_FILE
from mgt_scale.data.shards import TOKENIZER_FILE

WEIGHTS = "model.safetensors"  # the weights of an export (`mgt export`, and of the Hugging Face one)


class SourceError(ValueError):
    """Bad input (a path that holds no model, a config that does not fit the weights): exit 2."""


class ExportError(RuntimeError):
    pass


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (with a manifest), or a run directory -> its latest good checkpoint."""
    from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, verify_checkpoint
    p = Path(path)
    if not (p / MANIFEST).is_file():
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if (root / LATEST).is_file():
            p = root / (root / LATEST).read_text().strip()
        else:
            raise ExportError(f"{path}: neither a checkpoint directory nor a run directory with a "
                              f"checkpoints/{LATEST} pointer")
    problems = verify_checkpoint(p)
    if problems:
        raise ExportError(f"{p}: checkpoint rejected: " + "; ".join(problems))
    return p


def checkpoint_config(tag_dir: Path):
    from mgt_scale.config import load_config
    for c in (tag_dir / CONFIG_FILE, tag_dir.parent.parent / CONFIG_FILE):
        if c.is_file():
            return load_config(c), c
    raise ExportError(f"{tag_dir}: no {CONFIG_FILE} in the checkpoint or its run directory")


def consolidated_from_checkpoint(tag_dir: Path, cfg) -> dict[str, torch.Tensor]:
    """Canonical fp32 state dict from a sharded checkpoint, offline (no process group)."""
    from mgt_scale.config import canonical_mode
    from mgt_scale.checkpoint.manifest import MANIFEST
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    if canonical_mode(manifest.get("mode", "zero")) == "zero":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:  # pipeline: one file per layer, keyed by the layer's position in the PipelineModule
        from mgt_scale.parallel.convert import pipe_to_canonical
        merged = {}
        for f in sorted(tag_dir.glob("layer_*-model_states.pt")):
            idx = int(f.name.split("_")[1].split("-")[0])
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
                merged[f"{idx}.{k}"] = v
        sd = pipe_to_canonical(cfg.model, merged)
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


@dataclass
class Loaded:
    model: torch.nn.Module  # eval mode, fp32
    cfg: object  # mgt_scale.config.Config
    config_path: Path  # the config the model was built from
    tokenizer: Optional[Path]  # tokenizer.model next to an export, else in the config's data directory
    origin: str  # "export", "file" or the checkpoint directory


def load_state_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], weights: str | Path,
                       config_path: str | Path, tied: bool, given: bool = True) -> None:
    """Load `sd` into `model` (built from `config_path`) or raise SourceError naming the first tensor
    whose shape differs, or the first one missing on either side. `given`: the user chose the config
    (--config or --set), so the hint says how to use the saved one."""
    hint = ("pass the config the weights were trained with (or leave out --config and --set model.* to use the "
            "one saved with them)"
            if given else "the config saved with the weights does not describe them: pass the right one with --config")
    own = model.state_dict()
    for name, t in own.items():
        if name in sd and tuple(sd[name].shape) != tuple(t.shape):
            raise SourceError(f"config {config_path} does not fit the weights in {weights}: {name} has shape "
                              f"{list(sd[name].shape)} there but {list(t.shape)} in this config's model; {hint}")
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch the loop above cannot see (older layouts)
        first = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), str(e).splitlines()[0])
        raise SourceError(f"config {config_path} does not fit the weights in {weights}: {first}; {hint}") from None
    missing = [k for k in result.missing_keys if not (tied and k == "head.proj.weight")]
    if missing:
        raise SourceError(f"config {config_path} does not fit the weights in {weights}: {missing[0]} is "
                          f"not in the weights ({len(missing)} missing); {hint}")
    if result.unexpected_keys:
        raise SourceError(f"config {config_path} does not fit the weights in {weights}: "
                          f"{result.unexpected_keys[0]} is not in this config's model "
                          f"({len(result.unexpected_keys)} unknown); {hint}")


def _changes_the_function(key: str) -> bool:
    """Model keys that do not change what trained weights compute: initial values (`*init*`: the weights
    replace them), the fused vs op-by-op implementation of the same formula, and max_seq_len (rotary
    positions are computed, not learned; generation past it recomputes on a window)."""
    return not ("init" in key or key in ("fused", "max_seq_len"))


def _first_difference(a, b, prefix: str):
    """The first dotted key (and both values) where two nested model dicts differ in a way that changes
    the computed function, or None."""
    for k in list(a) + [k for k in b if k not in a]:
        if not _changes_the_function(k):
            continue
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, f"{prefix}.{k}")
            if found:
                return found
        elif x != y:
            return f"{prefix}.{k}", x, y
    return None


def check_same_model(cfg, saved_cfg, config_path: Path, saved_path: Path) -> None:
    """A config the user gave (--config, --set model.*) must describe the model the weights were trained
    as, not only its shapes: model.mgt.beta_input, lam, eps, the residual kind's details change the
    function with the same tensors, so a difference would silently compute with another formula."""
    import dataclasses
    diff = _first_difference(dataclasses.asdict(cfg.model), dataclasses.asdict(saved_cfg.model), "model")
    if diff:
        key, given, trained = diff
        raise SourceError(f"config {config_path}: {key} = {given!r}, but the weights were trained with "
                          f"{key} = {trained!r} ({saved_path}): the model would compute another function; "
                          f"leave out --config / --set model.* (the saved config is used) or set {key}: {trained!r}")


def _load_config(path: Path, overrides=()):
    from mgt_scale.config import ConfigError, load_config
    try:
        return load_config(path, list(overrides))
    except ConfigError as e:
        raise SourceError(str(e)) from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read config: {e.strerror or e}") from None


def _data_tokenizer(cfg) -> Optional[Path]:
    tok = Path(cfg.data.path) / TOKENIZER_FILE if cfg.data.path else None
    return tok if tok is not None and tok.is_file() else None


def open_model(source: str | Path, config: str | Path | None = None, overrides=(),
               dtype: torch.dtype = torch.float32) -> Loaded:
    """The model in `source` (export dir, model.safetensors, checkpoint dir or run dir), built from
    `config` if given (checked against the weights), else from the config saved with the weights."""
    from safetensors.torch import load_file
    from mgt_scale.model import build_model
    p = Path(source)
    if not p.exists():
        raise SourceError(f"{p}: no such file or directory (expected an export directory, a model.safetensors, "
                          f"a checkpoint directory or a run directory)")
    tokenizer = None
    if p.is_file() or (p / WEIGHTS).is_file():  # an export (directory) or a bare weights file
        wfile = p if p.is_file() else p / WEIGHTS
        saved = wfile.parent / CONFIG_FILE
        if config is None and not saved.is_file():
            raise SourceError(f"{wfile}: no {CONFIG_FILE} next to it: pass --config")
        try:
            sd = load_file(str(wfile))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise SourceError(f"{wfile}: not a readable safetensors file ({e})") from None
        if (wfile.parent / TOKENIZER_FILE).is_file():
            tokenizer = wfile.parent / TOKENIZER_FILE
        origin, weights = ("file" if p.is_file() else "export"), wfile
    else:
        from mgt_scale.checkpoint.manifest import LATEST, MANIFEST
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if not (p / MANIFEST).is_file() and not (root / LATEST).is_file():
            raise SourceError(f"{p}: neither an export directory ({WEIGHTS}), a checkpoint directory "
                              f"({MANIFEST}) nor a run directory with checkpoints/{LATEST}")
        try:
            tag = resolve_checkpoint(p)
            saved_cfg, saved = checkpoint_config(tag)
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's reader prints progress: keep stdout
                sd = consolidated_from_checkpoint(tag, saved_cfg)  # in memory: the run directory is untouched
        except ExportError as e:
            raise SourceError(str(e)) from None
        origin, weights = str(tag), tag
    config_path = Path(config) if config is not None else saved
    cfg = _load_config(config_path, overrides)
    model = build_model(cfg.model, seed=0)
    load_state_checked(model, {k: v.to(torch.float32) for k, v in sd.items()}, weights, config_path,
                       cfg.model.tie_embeddings, given=config is not None or bool(overrides))
    if (config is not None or overrides) and saved.is_file():
        check_same_model(cfg, _load_config(saved), config_path, saved)
    return Loaded(model.to(dtype).eval(), cfg, config_path, tokenizer or _data_tokenizer(cfg), origin)
