# Parameter names across layouts. Canonical names are MGTModel's (`embed.*`, `blocks.{i}.*`, `head.*`);
# DeepSpeed's pipeline names a parameter `{layer_idx}.xxx` (and tied ones `tied_modules.embed.xxx`).
# A consolidated fp32 state dict with canonical names is the exchange format between `zero3` and
# `pipeline` runs: `consolidated_state_dict(engine)` exports it from either engine and
# `load_consolidated(engine, sd)` loads it into either (weights only; optimizer moments start fresh).
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from mgt_scale.config import ModelConfig

_PIPE_RE = re.compile(r"^(\d+)\.(.+)$")
_TIED_PREFIX = "tied_modules.embed."


def pipe_layer_to_canonical(cfg: ModelConfig, layer_idx: int) -> str:
    """Canonical module prefix of pipeline layer `layer_idx` (see mgt_scale.parallel.pipeline)."""
    L = cfg.num_layers
    if layer_idx == 0:
        return "embed"
    if 1 <= layer_idx <= L:
        return f"blocks.{layer_idx - 1}"
    if layer_idx == L + 1:
        return "head"  # HeadPipe (untied) or HeadNormPipe (tied): both hold `norm.*` (+ `proj.*` untied)
    if cfg.tie_embeddings and layer_idx == L + 2:
        return "embed"
    raise KeyError(f"pipeline layer {layer_idx} does not exist for {L} blocks")


def canonical_to_pipe_layer(cfg: ModelConfig, name: str) -> tuple[int, str]:
    """(pipeline layer index, name inside the layer) of a canonical parameter name."""
    if name.startswith("embed."):
        return 0, name[len("embed."):]
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        return int(i) + 1, rest
    if name.startswith("head."):
        return cfg.num_layers + 1, name[len("head."):]
    raise KeyError(f"not a canonical parameter name: {name}")


def pipe_to_canonical(cfg: ModelConfig, state: dict) -> dict:
    """Pipeline state dict (any subset of stages) -> canonical names."""
    out = {}
    for k, v in state.items():
        if k.startswith(_TIED_PREFIX):
            out["embed." + k[len(_TIED_PREFIX):]] = v
            continue
        m = _PIPE_RE.match(k)
        if not m:
            raise KeyError(f"unexpected pipeline parameter name {k}")
        out[f"{pipe_layer_to_canonical(cfg, int(m.group(1)))}.{m.group(2)}"] = v
    if cfg.tie_embeddings and "embed.tok.weight" in out:
        out["head.proj.weight"] = out["embed.tok.weight"]
    return out


def canonical_to_pipe(cfg: ModelConfig, state: dict) -> dict:
    """Canonical state dict -> pipeline names (all layers; a stage loads the keys it holds)."""
    out = {}
    for k, v in state.items():
        if cfg.tie_embeddings and k == "head.proj.weight":
            continue
        if cfg.tie_embeddings and k.startswith("embed."):
            out[_TIED_PREFIX + k[len("embed."):]] = v
            continue
        idx, rest = canonical_to_pipe_layer(cfg, k)
        out[f"{idx}.{rest}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# Engine-level export / import


def _gather_objects(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def consolidated_state_dict(engine) -> dict:
    """Full fp32 state dict with canonical names, on every rank (collective). `engine` is a
    Zero3Engine or PipelineEngine (or anything with `.mode` and `.module`)."""
    if engine.mode == "pipeline":
        cfg = engine.cfg.model
        local = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
        merged: dict = {}
        for part in _gather_objects(local):
            merged.update(part)
        return pipe_to_canonical(cfg, merged)
    module = engine.module
    params = dict(module.named_parameters(remove_duplicate=False))
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed
        out = {}
        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().float().cpu().clone()
        return out
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def load_consolidated(engine, state: dict) -> None:
    """Load a canonical fp32 state dict into either engine (collective). Strict: every parameter of
    the engine's model must be present and no unknown key may be given."""
    if engine.mode == "pipeline":
        cfg = engine.cfg.model
        pipe_state = canonical_to_pipe(cfg, state)
        own = engine.module.state_dict()
        missing = [k for k in own if k not in pipe_state]
        if missing:
            raise KeyError(f"consolidated state lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        engine.module.load_state_dict({k: pipe_state[k] for k in own}, strict=True)
    else:
        params = dict(engine.module.named_parameters(remove_duplicate=False))
        unknown = [k for k in state if k not in params]
        missing = [k for k in params if k not in state]
        if unknown or missing:
            raise KeyError(f"consolidated state: unknown {unknown[:5]}, missing {missing[:5]}")
        zero3 = any(hasattr(p, "ds_id") for p in params.values())
        if zero3:
            import deepspeed
            for name, p in params.items():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if not dist.is_initialized() or dist.get_rank() == 0:
                        p.data.copy_(state[name].to(p.dtype))
        else:
            for name, p in params.items():
                p.data.copy_(state[name].to(p.device, p.dtype))
    opt = getattr(engine, "optimizer", None)
    inner = getattr(opt, "optimizer", None)
    for o in (opt, inner):
        if o is not None and hasattr(o, "refresh_fp32_params"):
            o.refresh_fp32_params()
            break
