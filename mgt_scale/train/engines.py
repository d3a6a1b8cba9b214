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


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return float(value)


class Zero3Engine:
    """DeepSpeed ZeRO (stage 3 by default) over all ranks; the whole model on each rank's graph."""

    mode = "zero3"

    def __init__(self, cfg: Config, plan: BatchPlan, precision: str):
        import deepspeed

        self.cfg, self.plan, self.precision = cfg, plan, precision
        self.ds_config = deepspeed_config(cfg, plan, precision)
        model = build_model(cfg.model, seed=cfg.train.seed)
        if cfg.parallel.activation_checkpointing:
            model.checkpoint_every = cfg.parallel.checkpoint_every_layers
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
        self.engine.train()
        losses = []
        for x, y in micro_batches:
            logits = self.engine(x.to(self.device))
            loss = lm_loss(logits, y.to(self.device))
            if inject_nan:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        loss_mean = _mean_over_ranks(torch.stack(losses).mean().cpu())
        norm = self.engine.get_global_grad_norm()
        return StepResult(loss=loss_mean, grad_norm=float(norm) if norm is not None else float("nan"))

    @torch.no_grad()
    def eval_loss(self, batches: Sequence[Batch], mask_fn=None) -> float:
        self.engine.eval()
        losses = []
        for x, y in batches:
            logits = self.engine(x.to(self.device))
            mask = mask_fn(y) if mask_fn else None
            losses.append(lm_loss(logits, y.to(self.device), None if mask is None else mask.to(self.device)))
        self.engine.train()
        return _mean_over_ranks(torch.stack(losses).mean().float().cpu())

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, load_dir: str, tag: str) -> Optional[dict]:
        _, client_state = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
        return client_state


def build_engine(cfg: Config, plan: BatchPlan, precision: str):
    if cfg.parallel.mode == "zero3":
        return Zero3Engine(cfg, plan, precision)
    from mgt_scale.train.pipeline_engine import PipelineEngine
    return PipelineEngine(cfg, plan, precision)
