# Parameter names across layouts. Canonical names are MGTModel's (`embed.*`, `blocks.{i}.*`, `head.*`);
# DeepSpeed's pipeline names a parameter `{layer_idx}.xxx` (and tied ones `tied_modules.embed.xxx`).
# A consolidated fp32 state dict with canonical names is the exchange format between `zero` and
# `pipeline` runs: `consolidated_state_dict(engine)` exports it from either engine and
# `load_consolidated(engine, sd)` loads it into either (weights only; optimizer moments start fresh);
# the engines do the gathering (mgt_scale.engine), this module the naming.
from __future__ import annotations

import re

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
# Engine-level export / import: each engine gathers and scatters its own layout
# (mgt_scale.engine.base.Engine.consolidated_state_dict / load_consolidated_state_dict).


def consolidated_state_dict(engine) -> dict:
    """Full fp32 state dict with canonical names, on every rank (collective); `engine` is an Engine."""
    return engine.consolidated_state_dict()


def load_consolidated(engine, state: dict) -> None:
    """Load a canonical fp32 state dict into an Engine (collective). Strict: every parameter of the
    engine's model must be present and no unknown key may be given."""
    engine.load_consolidated_state_dict(state)

