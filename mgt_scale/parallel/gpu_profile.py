# The GPU profile of the DeepSpeed config (`parallel.profile`): which ZeRO settings a GPU job gets,
# derived from the model (its largest ZeRO-3 fetch unit) and the job's shape (nodes x GPUs per node),
# each with the reason an operator reads in `mgt train --dry-run --nodes N --gpus-per-node G`.
# The CPU profile is the config the gloo test bench was measured with (mgt_scale/parallel/ds_config.py).
"""Sizing rules (elements, not bytes; DeepSpeed's keys count parameters):

- unit U = the parameter count of the largest unit ZeRO-3 fetches at once (a block with
  `parallel.zero3_fetch: block`, or the embedding / LM head when larger), counted on the meta device.
- `stage3_prefetch_bucket_size` = 2U: the next unit is gathered whole while this one computes, with
  room for the one after (DeepSpeed's 5e7 default is below one block at d_model 2048: 6.7e7).
- `stage3_max_live_parameters` = max(1e9, 3U): current + prefetched units stay resident.
- every size above is capped (PREFETCH_CAP, MAX_LIVE_CAP, REDUCE_BUCKET_CAP, ALLGATHER_BUCKET_CAP):
  for a block of billions of parameters, 2U or 3U would be tens of GB of buffers per GPU.
- `stage3_param_persistence_threshold` = 10 d_model: every per-channel vector (norm weights, the
  residual operators' packed vectors, ~5 d_model each) stays gathered; no matrix does.
- `reduce_bucket_size` = U: one reduce-scatter per block as the backward produces it, overlapped with
  the next block's backward; the exposed tail is one block.
- `allgather_bucket_size` = U (ZeRO-1/2 and DeepSpeed's BF16 optimizer; ZeRO-3 does not read it).
- `overlap_comm`: true (communication on its own stream).
- `zero_hpz_partition_size` = GPUs per node on several nodes (`parallel.hierarchical_partition: node`),
  unless the memory estimate with its secondary copy (2 bytes x params / GPUs per node in bf16) exceeds
  `parallel.hpz_memory_fraction` of `parallel.gpu_memory_gb` (memory_estimate).
- bf16: `data_types.grad_accum_dtype` fp32 and `communication_data_type` fp32: gradients accumulate
  over micro batches and are reduced in fp32 (DeepSpeed's default under bf16 is bf16 for both).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from mgt_scale.config import Config, ModelConfig
from mgt_scale.parallel.topology import BatchPlan

DS_MAX_LIVE_DEFAULT = 10 ** 9  # DeepSpeed 0.19.8's stage3_max_live_parameters default
# Absolute caps on the sizes (elements). DeepSpeed 0.19.8's defaults (deepspeed/runtime/zero/config.py):
# reduce_bucket_size 5e8, allgather_bucket_size 5e8, stage3_prefetch_bucket_size 5e7,
# stage3_max_live_parameters 1e9. GPT-NeoX trained its 20B model with reduce and allgather buckets of
# 1.26e9 (EleutherAI/gpt-neox configs/20B.yml, ZeRO-1 on 96 A100-40GB); its ZeRO-3 example
# (configs/13B-ZeRO3.yml) uses far smaller ones (3e6 reduce, 2e5 prefetch, 6e6 live, with offload).
# The buckets are reduced in fp32 here (communication_data_type) and overlap_comm keeps two: 5e8 is
# 4 GB per GPU. Prefetch 1e9 (2 GB in bf16) and 3e9 live (6 GB) keep one large unit gathered ahead.
REDUCE_BUCKET_CAP = 5 * 10 ** 8
ALLGATHER_BUCKET_CAP = 5 * 10 ** 8
PREFETCH_CAP = 10 ** 9
MAX_LIVE_CAP = 3 * 10 ** 9


@dataclass(frozen=True)
class JobShape:
    nodes: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def resolve_profile(profile: str, cuda: bool) -> str:
    """`auto` = gpu when CUDA is the accelerator, cpu otherwise."""
    if profile == "auto":
        return "gpu" if cuda else "cpu"
    return profile


def detect_profile(profile: str) -> str:
    """`auto` resolved for this machine (the accelerator rule of ds_config.detect_precision)."""
    import torch
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    return resolve_profile(profile, cuda)


def shape_from_env(world_size: int, local_world_size: Optional[int] = None) -> JobShape:
    """This job's shape: GPUs per node from `local_world_size` (a launched process's DistEnv: under srun
    LOCAL_WORLD_SIZE is only exported later, by mgt_scale.cluster.dist_env.apply), else LOCAL_WORLD_SIZE
    (exported by apply and by torchrun), else one node."""
    local = int(local_world_size or os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    local = max(1, min(local, world_size))
    if world_size % local:
        local = world_size
    return JobShape(nodes=world_size // local, gpus_per_node=local)


def unit_params(cfg: ModelConfig) -> dict:
    """Parameter counts of the units ZeRO-3 fetches as one (mgt_scale.model.unit_params: on the meta
    device, no memory; torch is imported here, not when this module loads)."""
    from mgt_scale.model import unit_params as count
    return count(cfg)


@dataclass(frozen=True)
class Sizes:
    unit: int
    unit_name: str
    prefetch: int
    max_live: int
    persistence: int
    reduce_bucket: int
    allgather_bucket: int


def sizes(cfg: Config) -> Sizes:
    # with zero3_fetch: module the fetches are per submodule, but a block is still what one layer's
    # forward needs and what the prefetch should cover
    counts = unit_params(cfg.model)
    name = max(counts, key=counts.get)
    u = counts[name]
    return Sizes(unit=u, unit_name=name, prefetch=min(2 * u, PREFETCH_CAP),
                 max_live=min(max(DS_MAX_LIVE_DEFAULT, 3 * u), MAX_LIVE_CAP), persistence=10 * cfg.model.d_model,
                 reduce_bucket=min(u, REDUCE_BUCKET_CAP), allgather_bucket=min(u, ALLGATHER_BUCKET_CAP))


def total_params(cfg: Config) -> int:
    counts = unit_params(cfg.model)
    return cfg.model.num_layers * counts["block"] + counts["embedding"] + counts["head"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of a ZeRO-3 job, activations not counted: `states` (parameters, fp32 gradient
    accumulation, fp32 master and Adam moments, partitioned over the data-parallel ranks), `working`
    (stage3_max_live_parameters gathered, two fp32 reduce buckets), `hpz` (the secondary copy)."""
    states: float
    working: float
    hpz: float
    budget: float  # parallel.hpz_memory_fraction x parallel.gpu_memory_gb

    def total(self, with_hpz: bool) -> float:
        return self.states + self.working + (self.hpz if with_hpz else 0.0)


def memory_estimate(cfg: Config, plan: BatchPlan, shape: JobShape) -> MemoryEstimate:
    p, s = cfg.parallel, sizes(cfg)
    n = total_params(cfg)
    pbytes = 4 if p.precision == "fp32" else 2  # auto on GPUs is bf16
    # bf16: parameter 2 + gradient accumulation 4 (grad_accum_dtype fp32) + master 4 + Adam 8; fp32: 4 + 4 + 8
    per_param = pbytes + 4 + (0 if p.offload_optimizer == "cpu" else (4 if pbytes == 2 else 0) + 8)
    states = per_param * n / max(plan.data_parallel, 1)
    working = min(s.max_live, n) * pbytes + 2 * s.reduce_bucket * 4
    hpz = pbytes * n / max(shape.gpus_per_node, 1)
    return MemoryEstimate(states, working, hpz, p.hpz_memory_fraction * p.gpu_memory_gb * 1e9)


def hpz_memory_problem(cfg: Config, plan: BatchPlan, shape: JobShape) -> str | None:
    """Why hpZ is off for memory (the estimate with it over the budget), or None."""
    m = memory_estimate(cfg, plan, shape)
    if m.total(True) <= m.budget:
        return None
    return (f"estimated {m.total(True) / 1e9:.1f} GB per GPU with it (secondary copy {m.hpz / 1e9:.1f} GB) > "
            f"{cfg.parallel.hpz_memory_fraction:g} x parallel.gpu_memory_gb {cfg.parallel.gpu_memory_gb:g} GB")


def hpz_partition(cfg: Config, plan: BatchPlan, shape: JobShape) -> int:
    """zero_hpz_partition_size: GPUs per node for a multi-node ZeRO-3 job, else 1 (flat)."""
    p = cfg.parallel
    if (p.mode != "zero" or p.zero_stage != 3 or p.hierarchical_partition != "node" or shape.nodes < 2
            or p.offload_params == "cpu" or plan.data_parallel % shape.gpus_per_node):
        return 1
    return shape.gpus_per_node


def zero_settings(cfg: Config, plan: BatchPlan, shape: JobShape) -> dict:
    """The zero_optimization keys the GPU profile adds to (or changes in) the CPU profile's."""
    p, s = cfg.parallel, sizes(cfg)
    if p.mode == "pipeline":
        return {"reduce_bucket_size": s.reduce_bucket, "allgather_bucket_size": s.allgather_bucket} \
            if p.zero_stage == 1 else {}
    out: dict = {"overlap_comm": True, "reduce_bucket_size": s.reduce_bucket}
    if p.zero_stage == 3:
        out.update({"stage3_prefetch_bucket_size": s.prefetch, "stage3_max_live_parameters": s.max_live,
                    "stage3_param_persistence_threshold": s.persistence})
        hpz = hpz_partition(cfg, plan, shape)
        if hpz > 1 and hpz_memory_problem(cfg, plan, shape) is None:
            out["zero_hpz_partition_size"] = hpz
    else:
        out["allgather_bucket_size"] = s.allgather_bucket
    return out


def bf16_settings(cfg: Config) -> dict:
    """Top-level keys for fp32 gradient accumulation and reduction under bf16.

    DeepSpeed 0.19.8 (runtime/engine.py `_do_optimizer_sanity_check`): ZeRO-1 + bf16 + fp32
    accumulation builds its BF16 optimizer (fp32 gradient buffers, and its step skips a non-finite
    gradient norm taken over all pipeline stages); ZeRO-3 accumulates the gradient partitions in
    `grad_accum_dtype`; ZeRO-0 + bf16 + fp32 accumulation raises NotImplementedError, so pipeline
    ZeRO-0 cannot have it (the GPU profile refuses that combination, see ds_config)."""
    if cfg.parallel.mode == "pipeline" and cfg.parallel.zero_stage == 0:
        return {}
    return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def describe(cfg: Config, plan: BatchPlan, precision: str, profile: str, shape: JobShape) -> list[str]:
    """The plan's lines for --dry-run: job shape, batch, sizes chosen and why, partition, precision."""
    p = cfg.parallel
    lines = [f"job: {shape.nodes} node(s) x {shape.gpus_per_node} GPU(s) = world {plan.world_size}; "
             f"mode {p.mode}, {plan.pipeline_stages} pipeline stage(s) x data-parallel {plan.data_parallel}",
             f"batch: global {plan.global_batch} = micro {plan.micro_batch} x accumulation {plan.grad_accum} "
             f"x data-parallel {plan.data_parallel}; {plan.tokens_per_step} tokens/step",
             f"profile: {profile}; precision {precision}"]
    if profile != "gpu":
        lines.append("  cpu profile: DeepSpeed's sizes, overlap_comm off (the gloo bench's settings)")
    else:
        s = sizes(cfg)
        counts = unit_params(cfg.model)
        lines.append(f"  largest unit: {s.unit_name}, {s.unit:,} params (block {counts['block']:,}, "
                     f"embedding {counts['embedding']:,}, head {counts['head']:,})")
        z = zero_settings(cfg, plan, shape)
        why = {"overlap_comm": "all-gathers and reduce-scatters on their own stream, under compute",
               "stage3_prefetch_bucket_size": f"2 x unit, at most {PREFETCH_CAP:.0e}: the next unit gathered "
                                              "during this one",
               "stage3_max_live_parameters": f"max(1e9, 3 x unit), at most {MAX_LIVE_CAP:.0e}: current + "
                                             "prefetched units resident",
               "stage3_param_persistence_threshold": "10 x d_model: per-channel vectors stay gathered",
               "reduce_bucket_size": f"1 x unit, at most {REDUCE_BUCKET_CAP:.0e}: one reduce-scatter per block, "
                                     "overlapped with the next",
               "allgather_bucket_size": f"1 x unit, at most {ALLGATHER_BUCKET_CAP:.0e}",
               "zero_hpz_partition_size": "GPUs per node: backward all-gathers stay inside the node (ZeRO++ hpZ)"}
        for key, value in z.items():
            lines.append(f"  {key} = {value:,}: {why[key]}" if not isinstance(value, bool)
                         else f"  {key} = {str(value).lower()}: {why[key]}")
        if p.mode == "zero" and p.zero_stage == 3:
            m = memory_estimate(cfg, plan, shape)
            lines.append(f"  memory per GPU (estimate, activations not counted): model states {m.states / 1e9:.1f} GB "
                         f"+ gathered parameters and buckets {m.working / 1e9:.1f} GB = {m.total(False) / 1e9:.1f} GB; "
                         f"budget {m.budget / 1e9:.1f} GB ({p.hpz_memory_fraction:g} x {p.gpu_memory_gb:g} GB)")
            if m.total(False) > m.budget:
                lines.append("  warning: the estimate exceeds the budget even without hpZ: use more GPUs, "
                             "parallel.offload_optimizer=cpu, or check parallel.gpu_memory_gb")
        if p.mode == "zero" and p.zero_stage == 3 and "zero_hpz_partition_size" not in z:
            mem = hpz_memory_problem(cfg, plan, shape) if hpz_partition(cfg, plan, shape) > 1 else None
            reason = ("one node" if shape.nodes < 2 else "parallel.hierarchical_partition=none"
                      if p.hierarchical_partition == "none" else "parameters offloaded to the CPU"
                      if p.offload_params == "cpu" else f"memory: {mem}" if mem
                      else "data-parallel size not a multiple of GPUs per node")
            lines.append(f"  hierarchical partition: none ({reason}); every all-gather spans the "
                         f"{plan.data_parallel} data-parallel ranks")
        elif "zero_hpz_partition_size" in z:
            total = cfg.model.num_layers * counts["block"] + counts["embedding"] + counts["head"]
            lines.append(f"  hierarchical partition: secondary bf16 copy over {shape.gpus_per_node} GPUs of a node, "
                         f"{2 * total / shape.gpus_per_node / 2**30:.1f} GiB per GPU "
                         f"({memory_estimate(cfg, plan, shape).total(True) / 1e9:.1f} GB per GPU with it)")
    if p.mode == "pipeline":
        from mgt_scale.parallel.pipeline import describe_partition, layer_params, partition_costs, planned_partition
        from mgt_scale.parallel.topology import bubble_fraction, bubble_warning
        parts = planned_partition(cfg, plan.pipeline_stages)
        weights = layer_params(cfg.model)
        params = [sum(weights[parts[s]:parts[s + 1]]) for s in range(plan.pipeline_stages)]
        info = {"ranges": list(zip(parts[:-1], parts[1:])), "params": params, "flops": partition_costs(cfg, parts),
                "balance": max(params) / (sum(params) / len(params))}
        lines += [f"partition_method {p.partition_method}; " + describe_partition(info),
                  f"bubble: (stages - 1) / (micro batches + stages - 1) = "
                  f"{bubble_fraction(plan.pipeline_stages, plan.grad_accum):.1%}"]
        if bubble_warning(cfg, plan):
            lines.append(bubble_warning(cfg, plan))
    if precision == "bf16":
        if profile == "gpu" and bf16_settings(cfg):
            lines.append("  bf16: gradients accumulate (data_types.grad_accum_dtype) and reduce "
                         "(communication_data_type) in fp32")
        else:
            lines.append("  bf16: DeepSpeed accumulates and reduces gradients in bf16 (its default)")
    return lines
