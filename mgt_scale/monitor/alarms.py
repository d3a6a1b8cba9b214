# Collapse alarm policy: turns one probe's per-layer geometry and the MonitorConfig thresholds into a
# decision (tripped? why? what should the trainer do?), and keeps the small monitor state (alarms
# fired, rollbacks done) that is saved in checkpoints. Pure logic: the trainer acts on the decision.
"""Collapse alarms.

Rules (thresholds of 0 switch a rule off):

* ``eff_rank_norm < monitor.alarm_eff_rank_norm_below`` at any layer, or
* ``cosine > monitor.alarm_cosine_above`` at any layer,
* only when ``step >= monitor.alarm_after_step`` (early training is allowed to look collapsed).

A NaN/missing metric at a layer trips an enabled rule too: hidden states that are not finite
are at least as alarming as collapsed ones.

Actions: ``none`` (not tripped), else ``monitor.alarm_policy``:

* ``warn``: log and continue;
* ``checkpoint_and_stop``: save a checkpoint and exit with exit_codes.COLLAPSE (not requeued);
* ``rollback``: restore the previous good checkpoint and continue. To avoid an endless
  rollback loop, :class:`CollapseMonitor` escalates a rollback to ``checkpoint_and_stop`` once
  ``monitor.alarm_max_rollbacks`` rollbacks have been ordered. The trainer must therefore keep the
  *live* monitor state across a rollback (not reload the one stored in the older checkpoint).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mgt_scale.config import MonitorConfig

Action = Literal["none", "warn", "checkpoint_and_stop", "rollback"]
ACTIONS: tuple[str, ...] = ("none", "warn", "checkpoint_and_stop", "rollback")
STATE_VERSION = 1
MAX_STORED_ALARMS = 100  # the state keeps the most recent alarms only (checkpoints stay small)


@dataclass
class AlarmDecision:
    step: int
    tripped: bool
    action: Action = "none"
    reasons: list[str] = field(default_factory=list)  # e.g. "layer 7: eff_rank_norm=0.0412 < 0.1"
    escalated: bool = False  # a rollback turned into checkpoint_and_stop (rollback budget spent)

    def message(self, max_reasons: int = 4) -> str:
        """One line for a log: action, step and the first few reasons."""
        if not self.tripped:
            return f"step {self.step}: no collapse alarm"
        shown = "; ".join(self.reasons[:max_reasons])
        more = f" (+{len(self.reasons) - max_reasons} more)" if len(self.reasons) > max_reasons else ""
        esc = " [escalated: rollback budget spent]" if self.escalated else ""
        return f"collapse alarm at step {self.step} -> {self.action}{esc}: {shown}{more}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(layer: Mapping[str, Any], key: str) -> float:
    v = layer.get(key)
    return math.nan if v is None else float(v)


def evaluate_alarms(cfg: MonitorConfig, step: int, layers: Sequence[Mapping[str, Any]]) -> AlarmDecision:
    """The decision for one probe (no state, no escalation). ``layers``: layer_geometry output."""
    if step < cfg.alarm_after_step:
        return AlarmDecision(step=step, tripped=False)
    reasons: list[str] = []
    rank_thr, cos_thr = cfg.alarm_eff_rank_norm_below, cfg.alarm_cosine_above
    for i, layer in enumerate(layers):
        idx = layer.get("layer", i)
        if rank_thr > 0:
            v = _value(layer, "eff_rank_norm")
            if not v >= rank_thr:  # also catches NaN
                reasons.append(f"layer {idx}: eff_rank_norm={v:.4g} < {rank_thr:g}")
        if cos_thr > 0:
            v = _value(layer, "cosine")
            if not v <= cos_thr:
                reasons.append(f"layer {idx}: cosine={v:.4g} > {cos_thr:g}")
    if not reasons:
        return AlarmDecision(step=step, tripped=False)
    return AlarmDecision(step=step, tripped=True, action=cfg.alarm_policy, reasons=reasons)


class MonitorState:
    """What the monitor remembers across restarts: alarms fired (the latest MAX_STORED_ALARMS),
    their total count, rollbacks ordered, and the last probed step."""

    def __init__(self) -> None:
        self.alarms: list[dict[str, Any]] = []
        self.num_alarms = 0
        self.num_rollbacks = 0
        self.last_probe_step = -1

    def record_probe(self, step: int) -> None:
        self.last_probe_step = max(self.last_probe_step, int(step))

    def record(self, decision: AlarmDecision) -> None:
        self.record_probe(decision.step)
        if not decision.tripped:
            return
        self.num_alarms += 1
        if decision.action == "rollback":
            self.num_rollbacks += 1
        self.alarms.append({"step": decision.step, "action": decision.action,
                            "reasons": decision.reasons[:8], "num_reasons": len(decision.reasons)})
        del self.alarms[:-MAX_STORED_ALARMS]

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "alarms": [dict(a) for a in self.alarms], "num_alarms": self.num_alarms,
                "num_rollbacks": self.num_rollbacks, "last_probe_step": self.last_probe_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"monitor state version {state.get('version')!r} is not {STATE_VERSION}")
        self.alarms = [dict(a) for a in state["alarms"]]
        self.num_alarms = int(state["num_alarms"])
        self.num_rollbacks = int(state["num_rollbacks"])
        self.last_probe_step = int(state["last_probe_step"])


class CollapseMonitor:
    """The stateful policy the trainer holds: when to probe, what to do about a probe.

    >>> mon = CollapseMonitor(cfg.monitor)
    >>> if mon.should_probe(step):
    ...     decision = mon.check(step, layer_geometry(hiddens))
    """

    def __init__(self, cfg: MonitorConfig, state: MonitorState | None = None) -> None:
        self.cfg = cfg
        self.state = state if state is not None else MonitorState()

    def should_probe(self, step: int) -> bool:
        return self.cfg.interval > 0 and step % self.cfg.interval == 0

    def check(self, step: int, layers: Sequence[Mapping[str, Any]]) -> AlarmDecision:
        decision = evaluate_alarms(self.cfg, step, layers)
        if decision.action == "rollback" and self.state.num_rollbacks >= self.cfg.alarm_max_rollbacks:
            decision.action = "checkpoint_and_stop"
            decision.escalated = True
        self.state.record(decision)
        return decision

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state.load_state_dict(state)
