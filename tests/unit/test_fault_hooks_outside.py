# Fault injection is test-only (issue #29): no MGT_FAULT_* variable is read and no test knob is taken by
# the production code; tests/fault_hooks wraps it from outside (sitecustomize on PYTHONPATH, or the
# `fault_hooks` fixture in-process), and the engines' train_step takes only the micro batches.
import inspect
import re
from pathlib import Path

from mgt_scale.engine import Engine
from mgt_scale.engine.pipeline import PipelineEngine
from mgt_scale.engine.zero import ZeroEngine

PACKAGE = Path(__file__).resolve().parents[2] / "mgt_scale"


def test_no_fault_injection_in_the_package():
    # (config/loading.py names the retired key train.fault_inject_nan_steps, to drop it from old configs)
    found = [f"{p.relative_to(PACKAGE.parent)}: {m.group()}" for p in sorted(PACKAGE.rglob("*.py"))
             for m in re.finditer(r"MGT_FAULT\w*|\binject_nan\b", p.read_text())]
    assert not found, found


def test_train_step_takes_only_the_micro_batches():
    for cls in (Engine, ZeroEngine, PipelineEngine):
        assert list(inspect.signature(cls.train_step).parameters) == ["self", "micro_batches"], cls


def test_the_fixture_slows_and_kills_through_the_checkpoint_callback(fault_hooks, monkeypatch):
    """MGT_FAULT_STEP_SLEEP / MGT_FAULT_SIGKILL_AT_STEP act after CheckpointCallback.on_step_end (where the
    callback itself once read them); the sleep and the kill are replaced to observe them."""
    from types import SimpleNamespace

    from mgt_scale.train.resume_callbacks import CheckpointCallback
    seen = []
    monkeypatch.setattr(fault_hooks.time, "sleep", lambda s: seen.append(("sleep", s)))
    monkeypatch.setattr(fault_hooks, "_sigkill", lambda msg: seen.append(("kill", msg)))
    monkeypatch.setenv("MGT_FAULT_STEP_SLEEP", "0.25")
    monkeypatch.setenv("MGT_FAULT_SIGKILL_AT_STEP", "3")
    manager = SimpleNamespace(poll=lambda: None)
    cb = CheckpointCallback(manager, SimpleNamespace(interval=0))
    for step in (2, 3):
        cb.on_step_end(SimpleNamespace(state=SimpleNamespace(step=step), is_main=True, max_steps=10), {})
    assert seen == [("sleep", 0.25), ("sleep", 0.25), ("kill", "SIGKILL at step 3")]
