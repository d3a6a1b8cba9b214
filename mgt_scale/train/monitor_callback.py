# Wires the collapse monitor into the training loop: every monitor.interval steps, a no-grad probe
# forward on a fixed batch measures per-layer geometry (and MGT beta/gate statistics), logs it to
# geometry.jsonl / W&B, and acts on the alarm policy (warn, checkpoint_and_stop, rollback through
# Trainer.rollback). Its state (the CollapseMonitor's alarm counts) is checkpointed under `monitor`.
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from mgt_scale import exit_codes
from mgt_scale.logs import get_logger
from mgt_scale.monitor.alarms import CollapseMonitor
from mgt_scale.monitor.metrics import geometry_summary
from mgt_scale.train.trainer import Callback, Phase, StopTraining, Trainer

log = get_logger(__name__)


def probe_tokens(cfg, vocab_size: int) -> torch.Tensor:
    """The fixed probe batch: validation data (or the synthetic stream) at monitor.probe_seq_len."""
    from mgt_scale.data import build_valid_batches
    m = cfg.monitor
    (inputs, _), = build_valid_batches(cfg.data, m.probe_seq_len, m.probe_batch_size, 1, vocab_size)
    return inputs


class MonitorCallback(Callback):
    """Probes on every rank (ZeRO-3 gathers parameters collectively in the forward; in pipeline mode
    each stage measures its own blocks and the stages' results are all-gathered); rank 0 logs. Every
    rank sees the same record, so every rank takes the same alarm decision.

    `monitor_cfg`: the config's `monitor` section; `probe`: returns the fixed probe batch (called at the
    start, when monitor.interval > 0); `checkpoint_cb`: saves before a stop."""
    name = "monitor"
    order = Phase.MONITOR

    def __init__(self, monitor_cfg, probe: Optional[Callable[[], torch.Tensor]], logger, checkpoint_cb):
        self.monitor_cfg, self.probe = monitor_cfg, probe
        self.logger, self.checkpoint_cb = logger, checkpoint_cb
        self.monitor = CollapseMonitor(monitor_cfg)
        self.tokens = None
        self.total_time = 0.0

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state)

    def on_start(self, trainer: Trainer) -> None:
        if self.monitor_cfg.interval and self.probe is not None:
            self.tokens = self.probe()

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        step = trainer.state.step
        if self.tokens is None or not self.monitor.should_probe(step):
            return
        tic = time.perf_counter()
        module = trainer.engine.module
        was_training = module.training
        geo = trainer.engine.probe_geometry(self.tokens, step, center=self.monitor_cfg.geometry_center)
        module.train(was_training)
        self.total_time += time.perf_counter() - tic
        summary = geometry_summary(geo["layers"])
        record["min_eff_rank_norm"] = summary["min_eff_rank_norm"]
        record["last_eff_rank_norm"] = summary["last_eff_rank_norm"]
        record["monitor_time"] = self.total_time
        decision = self.monitor.check(step, geo["layers"])
        if trainer.is_main:
            self.logger.log_geometry(geo, step)
        if not decision.tripped:
            return
        record["alarm"] = decision.action
        if trainer.is_main:
            log.info(f"COLLAPSE ALARM at step {step} ({decision.action}): {decision.message()}")
        if decision.action == "checkpoint_and_stop":
            self.checkpoint_cb.save(trainer)
            raise StopTraining(exit_codes.COLLAPSE, f"collapse alarm: {decision.message()}")
        if decision.action == "rollback" and trainer.rollback(record, "collapse alarm") is None:
            self.checkpoint_cb.save(trainer)
            raise StopTraining(exit_codes.COLLAPSE, "collapse alarm with policy rollback, but no checkpoint to roll back to")
