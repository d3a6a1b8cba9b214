# The engine interface (issue #29): ZeroEngine and PipelineEngine both implement the `Engine` Protocol
# (mgt_scale/engine/base.py), with every member the trainer, the checkpoint manager, the monitor and the
# converters call, so no caller branches on the mode. Structural checks on the classes and on instances
# made without starting DeepSpeed.
import inspect
import types

import pytest

from mgt_scale.engine import Engine, build_engine
from mgt_scale.engine.pipeline import PipelineEngine
from mgt_scale.engine.zero import ZeroEngine

MEMBERS = ("mode", "module", "dp_rank", "dp_size", "set_lr", "train_step", "eval_loss", "save", "load",
           "probe_geometry", "consolidated_state_dict", "load_consolidated_state_dict")
ENGINES = (ZeroEngine, PipelineEngine)


def protocol_members() -> set:
    attrs = getattr(Engine, "__protocol_attrs__", None)  # Python >= 3.12
    if attrs is None:
        from typing import _get_protocol_attrs  # Python 3.11
        attrs = _get_protocol_attrs(Engine)
    return set(attrs)


def bare(cls):
    """An instance without __init__ (no DeepSpeed): a stub DeepSpeed engine behind it."""
    obj = object.__new__(cls)
    grid = types.SimpleNamespace(get_data_parallel_rank=lambda: 0)
    obj.engine = types.SimpleNamespace(module=None, grid=grid, stage_id=0)
    obj.plan = types.SimpleNamespace(data_parallel=1)
    return obj


def test_the_protocol_declares_what_callers_use():
    assert protocol_members() == set(MEMBERS)


@pytest.mark.parametrize("cls", ENGINES)
def test_engine_class_has_every_member_of_the_protocol(cls):
    for name in MEMBERS:
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
    assert isinstance(bare(cls), Engine)


@pytest.mark.parametrize("cls", ENGINES)
def test_methods_take_the_protocols_parameters(cls):
    for name in MEMBERS:
        proto = getattr(Engine, name, None)
        if not inspect.isfunction(proto):
            continue
        want = list(inspect.signature(proto).parameters)
        got = list(inspect.signature(getattr(cls, name)).parameters)
        assert got == want, (cls.__name__, name, got, want)


def test_modes_are_the_config_names():
    from mgt_scale.config import ParallelConfig
    assert ZeroEngine.mode == ParallelConfig().mode == ParallelConfig(mode="zero3").mode == "zero"
    assert PipelineEngine.mode == ParallelConfig(mode="pipeline").mode == "pipeline"


def test_build_engine_picks_by_mode(monkeypatch):
    import dataclasses

    from mgt_scale.config import load_config
    made = []
    monkeypatch.setattr(ZeroEngine, "__init__", lambda self, *a: made.append("zero"))
    monkeypatch.setattr(PipelineEngine, "__init__", lambda self, *a: made.append("pipeline"))
    cfg = load_config(None, ["data.synthetic=random", "parallel.mode=zero3"])
    assert isinstance(build_engine(cfg, None, "fp32"), ZeroEngine)
    pcfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode="pipeline", zero_stage=0))
    assert isinstance(build_engine(pcfg, None, "fp32"), PipelineEngine)
    assert made == ["zero", "pipeline"]
