# The MGT stack as a DeepSpeed PipelineModule: one layer spec per pipeline-cuttable unit (embedding,
# each Block, head), so DeepSpeed can partition the stack into stages.
"""Model -> DeepSpeed pipeline layer specs.

Layer list (layer index = DeepSpeed's name prefix of a pipeline parameter, `{idx}.xxx`):

- untied:  0 `EmbeddingPipe`, 1..L `BlockPipe` (block i-1), L+1 `HeadPipe` (final norm + LM head)
- tied (`model.tie_embeddings`): 0 `TiedLayerSpec("embed", EmbeddingPipe)`, 1..L `BlockPipe`,
  L+1 `HeadNormPipe` (final norm), L+2 the same tied `EmbeddingPipe` run as the LM projection
  (its parameters live under `tied_modules.embed.*` on the first and last stage; DeepSpeed all-reduces
  their gradients)

Each wrapper initialises itself from the same per-unit generator as `MGTModel.init_weights`
(`module_generator(seed, unit_index)`: 0 embedding, 1..L blocks, L+1 head), so a pipeline run starts
from exactly the weights of a `zero3` run or of the plain single-process model, whatever the partition.
`mgt_scale.parallel.convert` maps pipeline names to the canonical `embed.*` / `blocks.{i}.*` / `head.*`.

ZeRO and pipelines: DeepSpeed's pipeline engine rejects ZeRO stages 2 and 3 (it partitions the stack
across stages itself); pipeline mode therefore runs ZeRO-0 or ZeRO-1 across the data-parallel replicas
of each stage, and config validation rejects `parallel.zero_stage > 1` with `parallel.mode: pipeline`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgt_scale.config import Config, ModelConfig
from mgt_scale.model import Block, Head, TokenEmbedding, lm_loss, module_generator
from mgt_scale.model.recompute import checkpoint_segment
from mgt_scale.model.residual_baselines import num_streams, reduce_streams
from mgt_scale.parallel.collectives import all_reduce


def _materialise(module: nn.Module, init: Callable[[], None]) -> None:
    """Allocate a module built on the meta device, then run our init (no default init first)."""
    module.to_empty(device="cpu")
    init()


class EmbeddingPipe(TokenEmbedding):
    """Token embedding (unit 0). As the tied LM projection it is called through `tied_lm_head`."""

    def __init__(self, cfg: ModelConfig, seed: int):
        with torch.device("meta"):
            super().__init__(cfg)
        _materialise(self, lambda: self.init_weights(cfg, module_generator(seed, 0)))


class BlockPipe(Block):
    """Block `layer_idx` (unit layer_idx + 1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, seed: int):
        with torch.device("meta"):
            super().__init__(cfg, layer_idx)
        _materialise(self, lambda: self.init_weights(cfg, module_generator(seed, layer_idx + 1)))


class HeadPipe(Head):
    """Final norm + LM head (unit L + 1), untied embeddings."""

    def __init__(self, cfg: ModelConfig, seed: int):
        with torch.device("meta"):
            super().__init__(cfg)
        _materialise(self, lambda: self.init_weights(cfg, module_generator(seed, cfg.num_layers + 1)))


class HeadNormPipe(nn.Module):
    """Final norm only (tied embeddings: the projection is the tied embedding); `mhc` streams summed first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.num_streams = num_streams(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(reduce_streams(x, self.num_streams))


def tied_lm_head(module: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.tok.weight)


class PipeLoss:
    """loss_fn of the PipelineModule: lm_loss; labels may be `targets` or `(targets, mask)`.
    `inject_nan` is a testing hook (train.fault_inject_nan_steps)."""

    __name__ = "lm_loss"

    def __init__(self) -> None:
        self.inject_nan = False

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        if isinstance(labels, (tuple, list)):
            loss = lm_loss(logits, labels[0], labels[1])
        else:
            loss = lm_loss(logits, labels)
        if self.inject_nan:
            loss = loss * float("nan")
        return loss


def layer_specs(cfg: ModelConfig, seed: int) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    blocks = [LayerSpec(BlockPipe, cfg, i, seed) for i in range(cfg.num_layers)]
    if cfg.tie_embeddings:
        return [TiedLayerSpec("embed", EmbeddingPipe, cfg, seed, tied_weight_attr=["tok.weight"]),
                *blocks, LayerSpec(HeadNormPipe, cfg),
                TiedLayerSpec("embed", EmbeddingPipe, cfg, seed, forward_fn=tied_lm_head,
                              tied_weight_attr=["tok.weight"])]
    return [LayerSpec(EmbeddingPipe, cfg, seed), *blocks, LayerSpec(HeadPipe, cfg, seed)]


def ds_partition_method(method: str) -> str:
    """Our `parallel.partition_method` -> DeepSpeed's (`type:Block` balances the BlockPipe layers)."""
    if method == "type:Block":
        return "type:BlockPipe"
    return method


def build_pipeline_module(cfg: Config, num_stages: int, loss_fn: Optional[PipeLoss] = None, verbose: bool = True):
    """The PipelineModule of the stack; needs torch.distributed initialised (every rank calls it).
    Activation checkpointing (`parallel.activation_checkpointing`) recomputes every
    `parallel.checkpoint_every_layers` consecutive layers of a stage (torch non-reentrant checkpoint,
    which also lets the embedding's segment get gradients; `parallel.checkpoint_policy` full or selective)."""
    from deepspeed.pipe import PipelineModule
    p = cfg.parallel
    interval = p.checkpoint_every_layers if p.activation_checkpointing else 0
    module = PipelineModule(layers=layer_specs(cfg.model, cfg.train.seed), num_stages=num_stages,
                            loss_fn=loss_fn or PipeLoss(), partition_method=ds_partition_method(p.partition_method),
                            activation_checkpoint_interval=interval,
                            activation_checkpoint_func=functools.partial(checkpoint_segment, policy=p.checkpoint_policy))
    info = partition_info(module)
    if verbose and torch.distributed.get_rank() == 0:
        print(describe_partition(info), flush=True)
    return module


def partition_info(module) -> dict:
    """Stage -> layer range and parameter count (collective over the pipeline's model group)."""
    import torch.distributed as dist
    parts = list(module.parts)
    stages = len(parts) - 1
    local = sum(p.numel() for p in module.parameters())
    counts = torch.zeros(stages, dtype=torch.float64)
    counts[module.stage_id] = float(local)
    if dist.is_initialized():
        counts = all_reduce(counts, group=module._grid.get_model_parallel_group())
    per_stage = [int(c) for c in counts.tolist()]
    mean = sum(per_stage) / stages
    return {"ranges": [(parts[s], parts[s + 1]) for s in range(stages)], "params": per_stage,
            "balance": max(per_stage) / mean if mean else 1.0}


def describe_partition(info: dict) -> str:
    lines = ["pipeline partition (layer 0 = embedding, 1..L = blocks, last = head):"]
    for s, ((a, b), n) in enumerate(zip(info["ranges"], info["params"])):
        lines.append(f"  stage {s}: layers [{a}, {b}) ({b - a} layers), {n:,} params")
    lines.append(f"  balance max/mean params per stage: {info['balance']:.4f}")
    return "\n".join(lines)
