# Unit tests of mgt_scale.monitor.alarms: each alarm policy, thresholds that trip and do not trip,
# alarm_after_step, NaN handling, rollback escalation, and the monitor state round trip.
import json

import pytest

from mgt_scale.config import MonitorConfig
from mgt_scale.monitor.alarms import (MAX_STORED_ALARMS, AlarmDecision, CollapseMonitor, MonitorState,
                                      evaluate_alarms)


def layers(ranks, cosines=None):
    cosines = cosines or [0.1] * len(ranks)
    return [{"layer": i, "eff_rank_norm": r, "cosine": c} for i, (r, c) in enumerate(zip(ranks, cosines))]


HEALTHY = layers([0.8, 0.6, 0.5])
COLLAPSED = layers([0.8, 0.05, 0.03], [0.1, 0.97, 0.99])


@pytest.mark.parametrize("policy", ["warn", "checkpoint_and_stop", "rollback"])
def test_each_policy_is_the_action_when_tripped(policy):
    cfg = MonitorConfig(alarm_eff_rank_norm_below=0.1, alarm_policy=policy)
    d = evaluate_alarms(cfg, 100, COLLAPSED)
    assert d.tripped and d.action == policy
    assert d.reasons == ["layer 1: eff_rank_norm=0.05 < 0.1", "layer 2: eff_rank_norm=0.03 < 0.1"]
    ok = evaluate_alarms(cfg, 100, HEALTHY)
    assert not ok.tripped and ok.action == "none" and ok.reasons == []


def test_cosine_rule_and_both_rules():
    cfg = MonitorConfig(alarm_cosine_above=0.95)
    d = evaluate_alarms(cfg, 5, COLLAPSED)
    assert d.tripped and d.reasons == ["layer 1: cosine=0.97 > 0.95", "layer 2: cosine=0.99 > 0.95"]
    assert not evaluate_alarms(MonitorConfig(alarm_cosine_above=0.995), 5, COLLAPSED).tripped
    both = evaluate_alarms(MonitorConfig(alarm_cosine_above=0.98, alarm_eff_rank_norm_below=0.04), 5, COLLAPSED)
    assert both.reasons == ["layer 2: eff_rank_norm=0.03 < 0.04", "layer 2: cosine=0.99 > 0.98"]


def test_thresholds_of_zero_are_off():
    assert not evaluate_alarms(MonitorConfig(), 10**6, COLLAPSED).tripped
    assert not evaluate_alarms(MonitorConfig(), 1, layers([float("nan")])).tripped


def test_threshold_boundary_does_not_trip():
    cfg = MonitorConfig(alarm_eff_rank_norm_below=0.5, alarm_cosine_above=0.1)
    assert not evaluate_alarms(cfg, 0, layers([0.5, 0.7])).tripped


def test_alarm_after_step():
    cfg = MonitorConfig(alarm_eff_rank_norm_below=0.1, alarm_after_step=200, alarm_policy="checkpoint_and_stop")
    assert not evaluate_alarms(cfg, 199, COLLAPSED).tripped
    assert evaluate_alarms(cfg, 200, COLLAPSED).action == "checkpoint_and_stop"


def test_nan_or_missing_metric_trips_an_enabled_rule():
    cfg = MonitorConfig(alarm_eff_rank_norm_below=0.1, alarm_cosine_above=0.9)
    d = evaluate_alarms(cfg, 1, [{"layer": 4, "eff_rank_norm": float("nan"), "cosine": None}])
    assert d.tripped and d.reasons == ["layer 4: eff_rank_norm=nan < 0.1", "layer 4: cosine=nan > 0.9"]


def test_message_is_short():
    d = AlarmDecision(step=3, tripped=True, action="warn", reasons=[f"r{i}" for i in range(10)])
    assert d.message(2) == "collapse alarm at step 3 -> warn: r0; r1 (+8 more)"
    assert "no collapse alarm" in AlarmDecision(step=3, tripped=False).message()


def test_rollback_escalates_after_budget_and_state_survives_checkpoint():
    cfg = MonitorConfig(alarm_eff_rank_norm_below=0.1, alarm_policy="rollback", alarm_max_rollbacks=2, interval=10)
    mon = CollapseMonitor(cfg)
    assert mon.should_probe(20) and not mon.should_probe(25)
    assert mon.check(10, HEALTHY).action == "none"
    assert mon.check(20, COLLAPSED).action == "rollback"
    assert mon.check(30, COLLAPSED).action == "rollback"
    state = json.loads(json.dumps(mon.state_dict()))  # must be JSON-serialisable for checkpoints
    restored = CollapseMonitor(cfg)
    restored.load_state_dict(state)
    third = restored.check(40, COLLAPSED)
    assert third.action == "checkpoint_and_stop" and third.escalated and "escalated" in third.message()
    s = restored.state_dict()
    assert s["num_alarms"] == 3 and s["num_rollbacks"] == 2 and s["last_probe_step"] == 40
    assert [a["step"] for a in s["alarms"]] == [20, 30, 40]


def test_zero_rollback_budget_stops_at_once():
    cfg = MonitorConfig(alarm_cosine_above=0.9, alarm_policy="rollback", alarm_max_rollbacks=0)
    assert CollapseMonitor(cfg).check(1, COLLAPSED).action == "checkpoint_and_stop"


def test_state_keeps_recent_alarms_only_and_checks_version():
    st = MonitorState()
    for i in range(MAX_STORED_ALARMS + 5):
        st.record(AlarmDecision(step=i, tripped=True, action="warn", reasons=["x"]))
    assert len(st.alarms) == MAX_STORED_ALARMS and st.num_alarms == MAX_STORED_ALARMS + 5
    assert st.alarms[0]["step"] == 5
    with pytest.raises(ValueError, match="version"):
        MonitorState().load_state_dict({**st.state_dict(), "version": 99})


def test_monitor_config_validation():
    from mgt_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="monitor.alarm_cosine_above"):
        load_config(None, ["data.synthetic=copy", "monitor.alarm_cosine_above=1.5"])
    with pytest.raises(ConfigError, match="monitor.alarm_max_rollbacks"):
        load_config(None, ["data.synthetic=copy", "monitor.alarm_max_rollbacks=-1"])
    with pytest.raises(ConfigError, match="monitor.probe_seq_len"):
        load_config(None, ["data.synthetic=copy", "monitor.probe_seq_len=100000"])
    cfg = load_config(None, ["data.synthetic=copy", "monitor.alarm_policy=rollback", "log.wandb_mode=offline"])
    assert cfg.monitor.alarm_policy == "rollback" and cfg.log.wandb_mode == "offline"
