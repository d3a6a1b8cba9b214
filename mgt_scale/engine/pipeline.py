# `parallel.mode: pipeline`: DeepSpeed's pipeline engine behind the Engine interface
# (mgt_scale.engine.base), as ZeroEngine is. Parallelism is applied to the model from outside: the stack
# cut into stages (mgt_scale.parallel.pipeline, each stage initialised through `mgt_scale.model.init_units`),
# activation checkpointing (mgt_scale.parallel.checkpointing), torch.compile of the stage's blocks
# (mgt_scale.parallel.compile), then `deepspeed.initialize`. ZeRO-0/1 only (DeepSpeed's
# pipeline engine rejects ZeRO-2/3; see mgt_scale.parallel.pipeline). With fp32 and ZeRO-0 it patches two
# things of DeepSpeed's engine, each through mgt_scale.parallel.ds_patches' guard (source checked,
# MGT_DS_PIPELINE_FIXES=0 turns both off): gradient clipping over all stages, and the skip of a step with
# non-finite gradients. Under bf16 DeepSpeed's optimizer skips such a step itself; the engine checks it did.
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from mgt_scale.config import Config
from mgt_scale.engine.base import (Batch, StepResult, accelerator_device, load_checkpoint, refresh_fp32_params,
                                   set_lr)
from mgt_scale.logs import get_logger
from mgt_scale.parallel import ds_patches
from mgt_scale.parallel.checkpointing import apply_activation_checkpointing
from mgt_scale.parallel.compile import compile_blocks
from mgt_scale.parallel.convert import canonical_to_pipe, pipe_to_canonical
from mgt_scale.parallel.ds_config import deepspeed_config
from mgt_scale.parallel.pipeline import PipeLoss, build_pipeline_module, partition_info
from mgt_scale.parallel.topology import BatchPlan
from mgt_scale.train.optim import build_optimizer

log = get_logger(__name__)


class PipelineEngine:
    """The stack cut into `parallel.pipeline_stages` stages; data parallel over the replicas.

    Every rank of one pipeline must be handed the same data-parallel rank's micro batches
    (`dp_rank`): DeepSpeed reads inputs on the first stage and labels on the last one.
    """

    mode = "pipeline"

    def __init__(self, cfg: Config, plan: BatchPlan, precision: str, ds_config: Optional[dict] = None):
        """`ds_config`: the DeepSpeed JSON (mgt_scale.engine.build_engine); None: deepspeed_config's for
        this process (its profile and job shape from the machine and LOCAL_WORLD_SIZE)."""
        from mgt_scale.parallel.ds_runtime import import_deepspeed
        deepspeed = import_deepspeed()

        self.cfg, self.plan, self.precision = cfg, plan, precision
        from mgt_scale.data.synthetic import loss_mask_fn
        self.loss_mask_fn = loss_mask_fn(cfg.data)  # data.copy_loss: copied; labels become (targets, mask)
        self.ds_config = ds_config if ds_config is not None else deepspeed_config(cfg, plan, precision)
        self.loss_fn = PipeLoss()
        module = build_pipeline_module(cfg, plan.pipeline_stages, self.loss_fn)
        apply_activation_checkpointing(module, cfg.parallel)  # read by deepspeed.initialize
        compile_blocks(module, cfg.parallel.compile, verbose=dist.get_rank() == 0)  # this stage's blocks
        self.partition = partition_info(module)
        optimizer = build_optimizer(module, cfg.train)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.ds_config)
        self.device = accelerator_device()
        self._grad_norm = float("nan")
        self._guarded = self._clipping = False
        if not self.engine.zero_optimization() and precision == "fp32":
            # DeepSpeed's ZeRO-0 fp32 clipping counts only model-parallel rank 0's gradients unless
            # parameters are marked model-parallel: clip over all stages ourselves (and keep the norm).
            if ds_patches.guard("pipeline-clip-all-stages"):
                self.engine.clip_fp32_gradients = self._clip_fp32_gradients
                self._clipping = True
            if ds_patches.guard("pipeline-nonfinite-skip"):
                self._guard_optimizer_step()
        elif precision == "bf16" and getattr(self.engine.optimizer, "check_grad_overflow", True):
            # bf16: DeepSpeed's own optimizer skips a step whose gradient norm (BF16 optimizer) or overflow
            # flag (ZeRO-1) is non-finite, taken over the model-parallel group, i.e. all stages of the replica
            # (tests/unit/test_pipeline_balance.py); an update applied on a non-finite loss is then a fault
            self._guarded = True
        self._warned_unguarded = False
        from mgt_scale.parallel.topology import bubble_warning
        if bubble_warning(cfg, plan) and dist.get_rank() == 0:
            log.warning(bubble_warning(cfg, plan).removeprefix("warning: "))

    # -- interface (mgt_scale.engine.base.Engine) ---------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def dp_rank(self) -> int:
        return self.engine.grid.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.plan.data_parallel

    @property
    def stage_id(self) -> int:
        return self.engine.stage_id

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def train_step(self, micro_batches: Sequence[Batch]) -> StepResult:
        if len(micro_batches) != self.engine.micro_batches:
            raise ValueError(f"pipeline step needs {self.engine.micro_batches} micro batches, got {len(micro_batches)}")
        self._grad_norm = float("nan")
        if self.loss_mask_fn:
            micro_batches = [(x, (y, self.loss_mask_fn(y))) for x, y in micro_batches]
        skipped_before = self.engine.skipped_steps
        loss = float(self.engine.train_batch(data_iter=iter(list(micro_batches))))
        skipped = self.engine.skipped_steps > skipped_before
        if not math.isfinite(loss) and not skipped and self._guarded:
            raise RuntimeError("non-finite loss but the guarded optimizer step applied the update")
        if not math.isfinite(loss) and not skipped and not self._warned_unguarded:
            self._warned_unguarded = True
            if dist.get_rank() == 0:
                log.warning("non-finite loss in pipeline mode with ZeRO-1 or bf16: DeepSpeed applied the update; "
                            "the non-finite guard will roll back after train.max_consecutive_nonfinite steps")
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._grad_norm
        return StepResult(loss=loss, grad_norm=float("nan") if skipped else float(norm), skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, batches: Sequence[Batch], mask_fn=None) -> float:
        mask_fn = mask_fn or self.loss_mask_fn
        data = [(x, (y, mask_fn(y))) if mask_fn else (x, y) for x, y in batches]
        loss = self.engine.eval_batch(iter(data), num_micro_batches=len(data))
        self.engine.module.train()
        return float(loss)

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, load_dir: str, tag: str, universal: bool = False) -> Optional[dict]:
        """`universal`: the directory holds a DeepSpeed universal checkpoint (another data-parallel size)."""
        return load_checkpoint(self.engine, load_dir, tag, universal)

    def probe_geometry(self, tokens: torch.Tensor, step: int, center: bool = False) -> dict[str, Any]:
        """Each stage probes its own blocks, the stages' results all-gathered (mgt_scale.parallel.pipeline_probe)."""
        from mgt_scale.parallel.pipeline_probe import pipeline_probe_geometry
        m = self.cfg.model
        return pipeline_probe_geometry(self.module, tokens, step, m.stream_width, m.num_layers, center=center)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's parameters all-gathered, renamed to the canonical names (mgt_scale.parallel.convert)."""
        local = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        merged: dict = {}
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        else:
            parts = [local]
        for part in parts:
            merged.update(part)
        return pipe_to_canonical(self.cfg.model, merged)

    @torch.no_grad()
    def load_consolidated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pipe_state = canonical_to_pipe(self.cfg.model, state)
        own = self.module.state_dict()
        missing = [k for k in own if k not in pipe_state]
        if missing:
            raise KeyError(f"consolidated state lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.module.load_state_dict({k: pipe_state[k] for k in own}, strict=True)
        refresh_fp32_params(self.optimizer)

    # -- internals ---------------------------------------------------------------------------------
    def _tied_owner(self, name: str) -> bool:
        """A tied parameter lives on several stages: count its gradient on the first one only."""
        return not name.startswith("tied_modules.") or self.engine.stage_id == 0

    @torch.no_grad()
    def _global_grad_norm(self) -> float:
        """L2 norm of the gradients of all stages (the same on every rank: the data-parallel all-reduce
        has run, and the stages' squares are summed over the model-parallel group)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for n, p in self.module.named_parameters():
            if p.grad is not None and self._tied_owner(n):
                sq += p.grad.detach().double().pow(2).sum()
        if dist.is_initialized():
            dist.all_reduce(sq, group=self.engine.grid.get_model_parallel_group())
        self._grad_norm = math.sqrt(float(sq))
        return self._grad_norm

    @torch.no_grad()
    def _clip_fp32_gradients(self) -> None:
        norm = self._global_grad_norm()
        coef = self.engine.gradient_clipping() / (norm + 1e-6)
        if coef < 1.0:  # False for a NaN norm: that step is skipped by the guarded optimizer step
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.detach().mul_(coef)

    def _guard_optimizer_step(self) -> None:
        """Skip the update of a step whose gradients are non-finite on any stage. In `zero` mode ZeRO's
        invalid-norm check does this; DeepSpeed's plain fp32 path (pipeline with ZeRO-0) has no such
        check and would write NaN into every weight. DeepSpeed reads `optimizer.overflow` after the
        step: when set it counts the step in `skipped_steps` (and zeroes the gradients as usual)."""
        opt = self.engine.optimizer
        inner_step = opt.step

        def step(*args, **kwargs):
            if self.engine.gradient_clipping() <= 0 or not self._clipping:  # no clip hook measured the norm
                self._global_grad_norm()
            opt.overflow = not math.isfinite(self._grad_norm)
            return None if opt.overflow else inner_step(*args, **kwargs)

        opt.overflow = False
        opt.step = step
        self._guarded = True
