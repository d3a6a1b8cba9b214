# Engine adapters: one interface (train_step, eval_loss, save, load, set_lr) over DeepSpeed's ZeRO
# engine (`parallel.mode: zero3`) and its pipeline engine (`parallel.mode: pipeline`), so the training
# loop does not care which one runs.
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mgt_scale.config import Config
from mgt_scale.model import build_model, lm_loss
from mgt_scale.parallel.collectives import any_rank, mean_over_ranks
from mgt_scale.parallel.compile import compile_blocks
from mgt_scale.parallel.ds_config import deepspeed_config
from mgt_scale.parallel.topology import BatchPlan
from mgt_scale.train.optim import build_optimizer

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    loss: float  # mean over the global batch (all micro batches, all data-parallel ranks)
    grad_norm: float
    skipped: bool = False


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def build_model_zero_init(cfg: Config, ds_config: dict) -> torch.nn.Module:
    """ZeRO-3: build the stack under `deepspeed.zero.Init`, so each parameter is partitioned across the
    ranks as soon as its module is constructed (a 200-layer stack is never whole on one rank), then
    initialise it one unit at a time: gather the unit's parameters, run the same per-unit init as
    `MGTModel.init_weights` (same generators, so the weights equal the plain path's) on rank 0, and let
    GatheredParameters scatter rank 0's values back into the partitions."""
    from mgt_scale.parallel.ds_runtime import import_deepspeed
    deepspeed = import_deepspeed()

    from mgt_scale.model import MGTModel, module_generator

    m, seed = cfg.model, cfg.train.seed
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = MGTModel(m)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    units = [(model.embed, 0), *((b, i + 1) for i, b in enumerate(model.blocks))]
    if not m.tie_embeddings:
        units.append((model.head, m.num_layers + 1))
    for unit, idx in units:
        with deepspeed.zero.GatheredParameters(list(unit.parameters()), modifier_rank=0):
            if rank0:
                unit.init_weights(m, module_generator(seed, idx))
    if m.tie_embeddings:  # head.proj.weight is the embedding's weight: only the final norm to reset
        with deepspeed.zero.GatheredParameters(list(model.head.norm.parameters()), modifier_rank=0):
            if rank0:
                model.head.norm.reset_parameters()
    return model


def mark_blocks_as_zero3_leaves(model: torch.nn.Module) -> None:
    """Make every transformer block a ZeRO-3 leaf module: DeepSpeed then gathers the block's parameters
    in one fetch before its forward (and its backward) and releases them after, instead of installing
    fetch/release hooks on each of its ~10 submodules. Must run before `deepspeed.initialize`, which
    registers the hooks. bench/throughput.py measures the gain (bench/RESULTS.md)."""
    from deepspeed.utils import set_z3_leaf_modules

    from mgt_scale.model.transformer import Block
    set_z3_leaf_modules(model, [Block])


class Zero3Engine:
    """DeepSpeed ZeRO (stage 3 by default) over all ranks; the whole model on each rank's graph."""

    mode = "zero3"

    def __init__(self, cfg: Config, plan: BatchPlan, precision: str):
        from mgt_scale.parallel.ds_runtime import import_deepspeed
        deepspeed = import_deepspeed()

        self.cfg, self.plan, self.precision = cfg, plan, precision
        from mgt_scale.data.synthetic import loss_mask_fn
        self.loss_mask_fn = loss_mask_fn(cfg.data)  # data.copy_loss: copied; None: every position
        self.ds_config = deepspeed_config(cfg, plan, precision)
        if cfg.parallel.zero_stage == 3:
            model = build_model_zero_init(cfg, self.ds_config)
        else:
            model = build_model(cfg.model, seed=cfg.train.seed)
        if cfg.parallel.activation_checkpointing:
            model.checkpoint_every = cfg.parallel.checkpoint_every_layers
            model.checkpoint_policy = cfg.parallel.checkpoint_policy
        if cfg.parallel.zero_stage == 3 and cfg.parallel.zero3_fetch == "block":
            mark_blocks_as_zero3_leaves(model)
        # after the leaf marking: ZeRO's hooks stay outside the compiled forward
        compile_blocks(model, cfg.parallel.compile, verbose=not dist.is_initialized() or dist.get_rank() == 0)
        optimizer = build_optimizer(model, cfg.train)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)
        self.device = _device()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train_step(self, micro_batches: Sequence[Batch], inject_nan: bool = False) -> StepResult:
        """Forward/backward every micro batch and take one optimizer step.

        Non-finite guard: if any rank's loss is non-finite (all-reduced flag, before backward), every
        rank back-propagates a NaN-scaled loss, so the reduced gradients are NaN everywhere; DeepSpeed's
        ZeRO optimizer then sees an invalid gradient norm and skips the update (no parameter change, no
        Adam moment or step-count change, gradients cleared) while its micro-step counters advance
        normally. The skip is confirmed through the engine's `skipped_steps` counter (non-finite
        gradients from a finite loss are skipped and reported the same way)."""
        self.engine.train()
        losses = []
        skipped_before = self.engine.skipped_steps
        nonfinite = False
        for x, y in micro_batches:
            logits = self.engine(x.to(self.device))
            mask = self.loss_mask_fn(y).to(self.device) if self.loss_mask_fn else None
            loss = lm_loss(logits, y.to(self.device), mask)
            if inject_nan:
                loss = loss * float("nan")
            bad = any_rank(not bool(torch.isfinite(loss.detach()).all()))
            if bad:
                nonfinite = True
                # NaN * grad on every parameter in the graph: the skip cannot depend on which rank was bad
                self.engine.backward(loss * float("nan") if torch.isfinite(loss.detach()).all() else loss)
            else:
                self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        loss_mean = mean_over_ranks(torch.stack(losses).mean())
        skipped = self.engine.skipped_steps > skipped_before
        if nonfinite and not skipped:
            raise RuntimeError("non-finite loss but DeepSpeed applied the update: the non-finite guard "
                               "depends on ZeRO's invalid-gradient-norm skip (check the DeepSpeed version)")
        norm = None if skipped else self.engine.get_global_grad_norm()
        return StepResult(loss=loss_mean, grad_norm=float(norm) if norm is not None else float("nan"),
                          skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, batches: Sequence[Batch], mask_fn=None) -> float:
        mask_fn = mask_fn or self.loss_mask_fn
        self.engine.eval()
        losses = []
        for x, y in batches:
            logits = self.engine(x.to(self.device))
            mask = mask_fn(y) if mask_fn else None
            losses.append(lm_loss(logits, y.to(self.device), None if mask is None else mask.to(self.device)))
        self.engine.train()
        return mean_over_ranks(torch.stack(losses).mean().float())

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, load_dir: str, tag: str, universal: bool = False) -> Optional[dict]:
        """`universal`: the directory holds a DeepSpeed universal checkpoint (any world size)."""
        conf = self.engine._config
        before = conf.load_universal_checkpoint
        conf.load_universal_checkpoint = universal
        try:
            _, client_state = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                          load_lr_scheduler_states=False)
        finally:
            conf.load_universal_checkpoint = before
        return client_state


def build_engine(cfg: Config, plan: BatchPlan, precision: str):
    if cfg.parallel.mode == "zero3":
        return Zero3Engine(cfg, plan, precision)
    from mgt_scale.train.pipeline_engine import PipelineEngine
    return PipelineEngine(cfg, plan, precision)
