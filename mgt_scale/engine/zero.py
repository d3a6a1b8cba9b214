# `parallel.mode: zero` (alias `zero3`): DeepSpeed's ZeRO engine, stages 1, 2 or 3 (`parallel.zero_stage`),
# over all ranks, with the whole model in each rank's graph. Parallelism is applied to the model from
# outside, in order: partitioned build (ZeRO-3: `deepspeed.zero.Init`, initialised unit by unit through
# `mgt_scale.model.init_units`), activation checkpointing (mgt_scale.parallel.checkpointing), ZeRO-3 leaf
# blocks, torch.compile of the blocks (mgt_scale.parallel.compile), then `deepspeed.initialize`.
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from mgt_scale.config import Config
from mgt_scale.engine.base import (Batch, StepResult, accelerator_device, load_checkpoint, refresh_fp32_params,
                                   set_lr)
from mgt_scale.model import MGTModel, build_model, init_units, lm_loss
from mgt_scale.parallel.checkpointing import apply_activation_checkpointing
from mgt_scale.parallel.collectives import any_rank, mean_over_ranks
from mgt_scale.parallel.compile import compile_blocks
from mgt_scale.parallel.ds_config import deepspeed_config
from mgt_scale.parallel.topology import BatchPlan
from mgt_scale.train.optim import build_optimizer


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def build_model_zero_init(cfg: Config, ds_config: dict) -> torch.nn.Module:
    """ZeRO-3: build the stack under `deepspeed.zero.Init`, so each parameter is partitioned across the
    ranks as soon as its module is constructed (a 200-layer stack is never whole on one rank), then
    initialise it one unit at a time through `init_units` (the plain model's path, so the weights equal
    it): each unit's parameters gathered, rank 0 writes them, GatheredParameters scatters its values
    back into the partitions."""
    from mgt_scale.parallel.ds_runtime import import_deepspeed
    deepspeed = import_deepspeed()

    @contextmanager
    def gathered(unit: torch.nn.Module):
        with deepspeed.zero.GatheredParameters(list(unit.parameters()), modifier_rank=0):
            yield _rank0()

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = MGTModel(cfg.model)
    init_units(model.units(), cfg.model, cfg.train.seed, gather=gathered)
    return model


def mark_blocks_as_zero3_leaves(model: torch.nn.Module) -> None:
    """Make every transformer block a ZeRO-3 leaf module: DeepSpeed then gathers the block's parameters
    in one fetch before its forward (and its backward) and releases them after, instead of installing
    fetch/release hooks on each of its ~10 submodules. Must run before `deepspeed.initialize`, which
    registers the hooks. bench/throughput.py measures the gain (bench/RESULTS.md)."""
    from deepspeed.utils import set_z3_leaf_modules

    from mgt_scale.model.transformer import Block
    set_z3_leaf_modules(model, [Block])


def _is_partitioned(params: dict) -> bool:
    return any(hasattr(p, "ds_id") for p in params.values())


class ZeroEngine:
    """DeepSpeed ZeRO (stage 3 by default, 1 and 2 too) over all ranks; every rank is a data-parallel rank."""

    mode = "zero"

    def __init__(self, cfg: Config, plan: BatchPlan, precision: str, ds_config: Optional[dict] = None):
        """`ds_config`: the DeepSpeed JSON (mgt_scale.engine.build_engine); None: deepspeed_config's for
        this process (its profile and job shape from the machine and LOCAL_WORLD_SIZE)."""
        from mgt_scale.parallel.ds_runtime import import_deepspeed
        deepspeed = import_deepspeed()

        self.cfg, self.plan, self.precision = cfg, plan, precision
        from mgt_scale.data.synthetic import loss_mask_fn
        self.loss_mask_fn = loss_mask_fn(cfg.data)  # data.copy_loss: copied; None: every position
        self.ds_config = ds_config if ds_config is not None else deepspeed_config(cfg, plan, precision)
        p = cfg.parallel
        if p.zero_stage == 3:
            model = build_model_zero_init(cfg, self.ds_config)
        else:
            model = build_model(cfg.model, seed=cfg.train.seed)
        apply_activation_checkpointing(model, p)
        if p.zero_stage == 3 and p.zero3_fetch == "block":
            mark_blocks_as_zero3_leaves(model)
        # after the leaf marking: ZeRO's hooks stay outside the compiled forward
        compile_blocks(model, p.compile, verbose=_rank0())
        optimizer = build_optimizer(model, cfg.train)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)
        self.device = accelerator_device()

    # -- interface (mgt_scale.engine.base.Engine) ---------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def dp_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def dp_size(self) -> int:
        return self.plan.data_parallel

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def train_step(self, micro_batches: Sequence[Batch]) -> StepResult:
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
        return load_checkpoint(self.engine, load_dir, tag, universal)

    def probe_geometry(self, tokens: torch.Tensor, step: int, center: bool = False) -> dict[str, Any]:
        """The whole model's forward on every rank (ZeRO-3 gathers the parameters collectively)."""
        from mgt_scale.monitor.probe import probe_geometry
        module = self.module
        return probe_geometry(module, tokens.to(next(module.parameters()).device), step, center=center)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters(remove_duplicate=False))
        if _is_partitioned(params):
            from mgt_scale.parallel.ds_runtime import import_deepspeed
            deepspeed = import_deepspeed()
            out = {}
            for name, p in params.items():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    out[name] = p.detach().float().cpu().clone()
            return out
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def load_consolidated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters(remove_duplicate=False))
        unknown = [k for k in state if k not in params]
        missing = [k for k in params if k not in state]
        if unknown or missing:
            raise KeyError(f"consolidated state: unknown {unknown[:5]}, missing {missing[:5]}")
        if _is_partitioned(params):
            from mgt_scale.parallel.ds_runtime import import_deepspeed
            deepspeed = import_deepspeed()
            for name, p in params.items():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if _rank0():
                        p.data.copy_(state[name].to(p.dtype))
        else:
            for name, p in params.items():
                p.data.copy_(state[name].to(p.device, p.dtype))
        refresh_fp32_params(self.optimizer)
