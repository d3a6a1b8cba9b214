# The MGT stack as a DeepSpeed PipelineModule: one layer spec per pipeline-cuttable unit (embedding,
# each Block, head), cut into stages by training FLOPs (`parallel.partition_method: flops`, boundaries
# computed here) or by one of DeepSpeed's methods.
"""Model -> DeepSpeed pipeline layer specs.

Layer list (layer index = DeepSpeed's name prefix of a pipeline parameter, `{idx}.xxx`):

- untied:  0 `EmbeddingPipe`, 1..L `BlockPipe` (block i-1), L+1 `HeadPipe` (final norm + LM head)
- tied (`model.tie_embeddings`): 0 `TiedLayerSpec("embed", EmbeddingPipe)`, 1..L `BlockPipe`,
  L+1 `HeadNormPipe` (final norm), L+2 the same tied `EmbeddingPipe` run as the LM projection
  (its parameters live under `tied_modules.embed.*` on the first and last stage; DeepSpeed all-reduces
  their gradients)

Each wrapper initialises itself through `mgt_scale.model.init_units`, the path of `MGTModel.init_weights`
(`module_generator(seed, unit_index)`: 0 embedding, 1..L blocks, L+1 head), so a pipeline run starts
from exactly the weights of a `zero` run or of the plain single-process model, whatever the partition.
Activation checkpointing is applied to the built PipelineModule from outside
(mgt_scale.parallel.checkpointing: DeepSpeed's `activation_checkpoint_interval` with our checkpoint function).
`mgt_scale.parallel.convert` maps pipeline names to the canonical `embed.*` / `blocks.{i}.*` / `head.*`.

ZeRO and pipelines: DeepSpeed's pipeline engine rejects ZeRO stages 2 and 3 (it partitions the stack
across stages itself); pipeline mode therefore runs ZeRO-0 or ZeRO-1 across the data-parallel replicas
of each stage, and config validation rejects `parallel.zero_stage > 1` with `parallel.mode: pipeline`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgt_scale.config import Config, ModelConfig
from mgt_scale.logs import get_logger
from mgt_scale.model import Block, Head, TokenEmbedding, init_units, lm_loss, unit_params
from mgt_scale.model.residual_baselines import num_streams, reduce_streams
from mgt_scale.parallel.collectives import all_reduce

log = get_logger(__name__)


def _materialise(module: nn.Module, cfg: ModelConfig, seed: int, unit_index: int) -> None:
    """Allocate a module built on the meta device, then run our init (no default init first)."""
    module.to_empty(device="cpu")
    init_units([(module, unit_index)], cfg, seed)


class EmbeddingPipe(TokenEmbedding):
    """Token embedding (unit 0). As the tied LM projection it is called through `tied_lm_head`."""

    def __init__(self, cfg: ModelConfig, seed: int):
        with torch.device("meta"):
            super().__init__(cfg)
        _materialise(self, cfg, seed, 0)


class BlockPipe(Block):
    """Block `layer_idx` (unit layer_idx + 1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, seed: int):
        with torch.device("meta"):
            super().__init__(cfg, layer_idx)
        _materialise(self, cfg, seed, layer_idx + 1)


class HeadPipe(Head):
    """Final norm + LM head (unit L + 1), untied embeddings."""

    def __init__(self, cfg: ModelConfig, seed: int):
        with torch.device("meta"):
            super().__init__(cfg)
        _materialise(self, cfg, seed, cfg.num_layers + 1)


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
    """loss_fn of the PipelineModule: lm_loss; labels may be `targets` or `(targets, mask)`."""

    __name__ = "lm_loss"

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        if isinstance(labels, (tuple, list)):
            return lm_loss(logits, labels[0], labels[1])
        return lm_loss(logits, labels)


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
    """Our `parallel.partition_method` -> DeepSpeed's (`type:Block` balances the BlockPipe layers).
    "flops" is ours: its stage boundaries are computed here (`flops_partition`) and given to
    `GivenPartitionModule`; DeepSpeed's "parameters" is what a refusal of that patch falls back to."""
    if method == "type:Block":
        return "type:BlockPipe"
    if method == "flops":
        return "parameters"
    return method


def layer_costs(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Training FLOPs per token of each pipeline layer, in `layer_specs` order (mgt_scale.train.flops):
    the embedding lookup 0 (no matmul), each block its matmuls and attention, the LM head 6 x V x d (the
    final norm alone, tied embeddings, 0). Layer names (`{idx}.xxx`) do not depend on the partition."""
    from mgt_scale.train.flops import block_flops_per_token
    block = int(block_flops_per_token(cfg, seq_len))
    head = 6 * cfg.vocab_size * cfg.d_model
    tail = [0, head] if cfg.tie_embeddings else [head]
    return [0, *([block] * cfg.num_layers), *tail]


def balanced_partition(costs: list[int], stages: int) -> list[int]:
    """Boundaries [0, b1, ..., n] of `stages` contiguous non-empty parts whose largest summed cost is the
    smallest possible (a pipeline runs at the pace of its slowest stage). Exact: the smallest feasible
    bound among all contiguous sums (binary search, greedy check), then parts split to make `stages`."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"{stages} stages for {n} layers")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def greedy(limit: int) -> Optional[list[int]]:
        bounds = [0]
        for i in range(n):
            if prefix[i + 1] - prefix[bounds[-1]] > limit:
                if costs[i] > limit:
                    return None
                bounds.append(i)
        return bounds + [n]

    candidates = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        found = greedy(candidates[mid])
        if found is not None and len(found) - 1 <= stages:
            hi = mid
        else:
            lo = mid + 1
    bounds = greedy(candidates[lo])
    while len(bounds) - 1 < stages:  # split the costliest part of several layers at its balance point
        parts = [k for k in range(len(bounds) - 1) if bounds[k + 1] - bounds[k] > 1]
        k = max(parts, key=lambda k: (prefix[bounds[k + 1]] - prefix[bounds[k]], -k))
        a, b = bounds[k], bounds[k + 1]
        cut = min(range(a + 1, b), key=lambda c: abs((prefix[c] - prefix[a]) - (prefix[b] - prefix[c])))
        bounds.insert(k + 1, cut)
    return bounds


def flops_partition(cfg: Config, stages: int) -> list[int]:
    return balanced_partition(layer_costs(cfg.model, cfg.data.seq_len), stages)


def layer_params(cfg: ModelConfig) -> list[int]:
    """Parameter count of each pipeline layer, counted on the meta device (as DeepSpeed's "parameters"
    method counts them: a tied embedding at both ends)."""
    u = unit_params(cfg)
    tail = [2 * cfg.d_model, u["embedding"]] if cfg.tie_embeddings else [u["head"]]
    return [u["embedding"], *([u["block"]] * cfg.num_layers), *tail]


def planned_partition(cfg: Config, stages: int) -> list[int]:
    """The boundaries `build_pipeline_module` will use, computed without a process group (--dry-run)."""
    from deepspeed.runtime import utils as ds_utils
    method = cfg.parallel.partition_method
    if method == "flops":
        return flops_partition(cfg, stages)
    n = cfg.model.num_layers + (3 if cfg.model.tie_embeddings else 2)
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=n, num_parts=stages)
    if method == "parameters":
        return ds_utils.partition_balanced(weights=layer_params(cfg.model), num_parts=stages)
    blocks = [0] + [1] * cfg.model.num_layers + [0] * (n - 1 - cfg.model.num_layers)
    return ds_utils.partition_balanced(weights=blocks, num_parts=stages)


def partition_costs(cfg: Config, parts: list[int]) -> list[int]:
    costs = layer_costs(cfg.model, cfg.data.seq_len)
    return [sum(costs[parts[s]:parts[s + 1]]) for s in range(len(parts) - 1)]


def _given_partition_class():
    """PipelineModule whose stage boundaries are given (`parts`) instead of computed by DeepSpeed: it
    replaces `_partition_layers`, which DeepSpeed's __init__ calls once to set `parts` and this stage's
    bounds (guarded: ds_patches "pipeline-given-partition")."""
    from deepspeed.pipe import PipelineModule

    class GivenPartitionModule(PipelineModule):
        def __init__(self, *args, parts: list[int], **kwargs):
            object.__setattr__(self, "_given_parts", list(parts))  # read by __init__, before nn.Module's
            super().__init__(*args, **kwargs)

        def _partition_layers(self, method="uniform"):
            if len(self._given_parts) != self.num_stages + 1 or self._given_parts[-1] != len(self._layer_specs):
                raise ValueError(f"given partition {self._given_parts} does not fit {self.num_stages} stages "
                                 f"of {len(self._layer_specs)} layers")
            self.parts = list(self._given_parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return GivenPartitionModule


def build_pipeline_module(cfg: Config, num_stages: int, loss_fn: Optional[PipeLoss] = None, verbose: bool = True):
    """The PipelineModule of the stack; needs torch.distributed initialised (every rank calls it).
    Activation checkpointing is applied to it afterwards (mgt_scale.parallel.checkpointing)."""
    from deepspeed.pipe import PipelineModule

    from mgt_scale.parallel import ds_patches
    p = cfg.parallel
    kwargs = dict(layers=layer_specs(cfg.model, cfg.train.seed), num_stages=num_stages, loss_fn=loss_fn or PipeLoss(),
                  partition_method=ds_partition_method(p.partition_method))
    notes = []
    if p.partition_method == "flops" and ds_patches.guard("pipeline-given-partition"):
        module = _given_partition_class()(parts=flops_partition(cfg, num_stages), **kwargs)
    else:
        if p.partition_method == "flops":
            notes.append("partition_method flops: pipeline-given-partition NOT installed "
                         f"({ds_patches.refusal('pipeline-given-partition')}); DeepSpeed's 'parameters' used")
        module = PipelineModule(**kwargs)
    info = partition_info(module)
    info["flops"] = partition_costs(cfg, info["parts"])
    if verbose and torch.distributed.get_rank() == 0:
        log.info(describe_partition(info))
        for note in notes:
            log.warning(note)
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
            "balance": max(per_stage) / mean if mean else 1.0, "parts": parts}


def describe_partition(info: dict) -> str:
    """The partition's lines; with info["flops"] (per-stage FLOPs per token) each stage's share too."""
    flops = info.get("flops")
    lines = ["pipeline partition (layer 0 = embedding, 1..L = blocks, last = head):"]
    for s, ((a, b), n) in enumerate(zip(info["ranges"], info["params"])):
        share = f", {flops[s] / sum(flops):.1%} of FLOPs" if flops and sum(flops) else ""
        lines.append(f"  stage {s}: layers [{a}, {b}) ({b - a} layers), {n:,} params{share}")
    lines.append(f"  balance max/mean params per stage: {info['balance']:.4f}")
    if flops and sum(flops):
        lines.append(f"  balance max/mean FLOPs per stage: {max(flops) / (sum(flops) / len(flops)):.4f}")
    return "\n".join(lines)
