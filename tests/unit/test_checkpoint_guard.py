# NonFiniteGuard without an engine: counting, spike flags, policy stop, and its state round trip.
import math
from types import SimpleNamespace

import pytest

from mgt_scale import exit_codes
from mgt_scale.config import load_config
from mgt_scale.train.nonfinite import NonFiniteGuard
from mgt_scale.train.trainer import StopTraining, TrainState


def train_cfg(policy="stop", k=2):
    return load_config(None, ["data.synthetic=copy", f"train.nonfinite_policy={policy}",
                              f"train.max_consecutive_nonfinite={k}", "train.spike_zscore=4"]).train


def fake(rollback=lambda record, why: None):
    return SimpleNamespace(state=TrainState(), is_main=True, rollback=rollback)


def step(guard, tr, loss, skipped=False):
    tr.state.step += 1
    rec = {"step": tr.state.step, "loss": loss}
    if skipped:
        rec["skipped"] = True
    for _, hook in guard.step_hooks():  # GUARD, then ENFORCE
        hook(tr, rec)
    return rec


def test_spike_flagged_and_nan_counted_then_stop():
    tr, g = fake(), NonFiniteGuard(train_cfg())
    for i in range(20):
        assert "spike" not in step(g, tr, 3.0 + 0.01 * (i % 3))
    rec = step(g, tr, 5.0)
    assert rec["spike"] > 4
    rec = step(g, tr, math.nan, skipped=True)
    assert rec["nonfinite_total"] == 1 and tr.state.nonfinite_consecutive == 1
    step(g, tr, 3.0)
    assert tr.state.nonfinite_consecutive == 0 and tr.state.nonfinite_total == 1
    step(g, tr, math.nan, skipped=True)
    with pytest.raises(StopTraining) as e:
        step(g, tr, math.inf, skipped=True)
    assert e.value.exit_code == exit_codes.NONFINITE
    g2 = NonFiniteGuard(train_cfg())
    g2.load_state_dict(g.state_dict())
    assert list(g2.window) == list(g.window) and g2.state_dict() == g.state_dict()


def test_rollback_without_checkpoint_stops():
    tr = fake()  # Trainer.rollback finds no checkpoint
    g = NonFiniteGuard(train_cfg("rollback", 1))
    with pytest.raises(StopTraining) as e:
        step(g, tr, math.nan, skipped=True)
    assert e.value.exit_code == exit_codes.NONFINITE and "no good checkpoint" in e.value.reason
