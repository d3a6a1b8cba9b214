# Wires the collapse monitor into the training loop: every monitor.interval steps, a no-grad probe
# forward on a fixed batch measures per-layer geometry (and MGT beta/gate statistics), logs it to
# geometry.jsonl / W&B, and acts on the alarm policy (warn, checkpoint_and_stop, rollback).
from __future__ import annotations

import time

import torch

from mgt_scale import exit_codes
from mgt_scale.monitor.alarms import CollapseMonitor
from mgt_scale.monitor.metrics import geometry_summary
from mgt_scale.train.trainer import Callback, StopTraining, Trainer


def probe_tokens(cfg, vocab_size: int) -> torch.Tensor:
    """The fixed probe batch: validation data (or the synthetic stream) at monitor.probe_seq_len."""
    from mgt_scale.data import build_valid_batches
    m = cfg.monitor
    (inputs, _), = build_valid_batches(cfg.data, m.probe_seq_len, m.probe_batch_size, 1, vocab_size)
    return inputs


class MonitorCallback(Callback):
    """Probes on every rank (ZeRO-3 gathers parameters collectively in the forward; in pipeline mode
    each stage measures its own blocks and the stages' results are all-gathered); rank 0 logs. Every
    rank sees the same record, so every rank takes the same alarm decision."""

    def __init__(self, cfg, logger, checkpoint_cb, manager, restored_state: dict | None = None):
        self.cfg, self.logger, self.checkpoint_cb, self.manager = cfg, logger, checkpoint_cb, manager
        self.monitor = CollapseMonitor(cfg.monitor)
        if restored_state:
            self.monitor.load_state_dict(restored_state)
        self.tokens = None
        self.total_time = 0.0

    def on_start(self, trainer: Trainer) -> None:
        if self.cfg.monitor.interval:
            self.tokens = probe_tokens(self.cfg, self.cfg.model.vocab_size)
        trainer.state_providers = getattr(trainer, "state_providers", {})
        trainer.state_providers["monitor"] = self.monitor.state_dict

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        step = trainer.state.step
        if self.tokens is None or not self.monitor.should_probe(step):
            return
        tic = time.perf_counter()
        module = trainer.engine.module
        was_training = module.training
        geo = trainer.engine.probe_geometry(self.tokens, step, center=self.cfg.monitor.geometry_center)
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
            print(f"COLLAPSE ALARM at step {step} ({decision.action}): {decision.message()}", flush=True)
        if decision.action == "checkpoint_and_stop":
            self.checkpoint_cb.save(trainer)
            raise StopTraining(exit_codes.COLLAPSE, f"collapse alarm: {decision.message()}")
        if decision.action == "rollback":
            self._rollback(trainer)

    def _rollback(self, trainer: Trainer) -> None:
        """Restore weights and optimizer from the last good checkpoint; the data position moves on
        (the batches that led to the collapse are not replayed) and the monitor keeps its live state,
        so repeated rollbacks escalate to checkpoint_and_stop."""
        tag_dir = self.manager.find_resume()
        if tag_dir is None:
            self.checkpoint_cb.save(trainer)
            raise StopTraining(exit_codes.COLLAPSE, "collapse alarm with policy rollback, but no checkpoint to roll back to")
        state = self.manager.load(trainer.engine, tag_dir)
        if trainer.is_main:
            print(f"rolled back to {tag_dir.name} (step {state['step']}); data position kept at "
                  f"{trainer.loader.consumed_samples} samples", flush=True)
        trainer.state.step = state["step"]
