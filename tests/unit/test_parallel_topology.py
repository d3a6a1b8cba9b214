# Topology / batch arithmetic errors and the ZeRO-2/3-with-pipeline config error.
import pytest

from mgt_scale.config import ConfigError, from_dict
from mgt_scale.parallel.topology import plan_batch

BASE = {"data": {"synthetic": "copy", "seq_len": 16},
        "model": {"num_layers": 4, "d_model": 32, "num_heads": 2, "max_seq_len": 32},
        "monitor": {"interval": 0}}


def cfg(parallel=None, train=None):
    d = dict(BASE, parallel=parallel or {}, train=dict({"global_batch_size": 8, "micro_batch_size": 2}, **(train or {})))
    return from_dict(d)


def test_plan_zero3():
    p = plan_batch(cfg(), 2)
    assert (p.data_parallel, p.grad_accum, p.pipeline_stages, p.tokens_per_step) == (2, 2, 1, 8 * 16)


def test_plan_pipeline():
    p = plan_batch(cfg({"mode": "pipeline", "pipeline_stages": 2, "zero_stage": 0}), 4)
    assert (p.data_parallel, p.grad_accum, p.pipeline_stages) == (2, 2, 2)


def test_stages_do_not_divide_world():
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        plan_batch(cfg({"mode": "pipeline", "pipeline_stages": 2, "zero_stage": 1}), 3)


def test_global_batch_not_multiple():
    with pytest.raises(ConfigError, match="train.global_batch_size=8 is not micro_batch_size"):
        plan_batch(cfg(train={"micro_batch_size": 4}), 4)
    with pytest.raises(ConfigError, match="multiple of 6"):
        plan_batch(cfg(), 3)


def test_bad_world_size():
    with pytest.raises(ConfigError, match="world size must be >= 1"):
        plan_batch(cfg(), 0)


@pytest.mark.parametrize("stage", [2, 3])
def test_pipeline_rejects_zero_2_3(stage):
    with pytest.raises(ConfigError, match=f"parallel.zero_stage: ZeRO stage {stage} is incompatible"):
        cfg({"mode": "pipeline", "pipeline_stages": 2, "zero_stage": stage})


def test_pipeline_default_zero_stage_is_rejected():
    # ParallelConfig.zero_stage defaults to 3 (zero3 mode): pipeline mode must set 0 or 1 explicitly
    with pytest.raises(ConfigError, match="pipeline engine"):
        cfg({"mode": "pipeline", "pipeline_stages": 2})


def test_zero3_mode_rejects_stages_and_too_many_stages():
    with pytest.raises(ConfigError, match="parallel.pipeline_stages: must be 1 in zero mode"):
        cfg({"mode": "zero3", "pipeline_stages": 2})
    with pytest.raises(ConfigError, match="5 stages for 4 layers"):
        cfg({"mode": "pipeline", "pipeline_stages": 5, "zero_stage": 0})


def test_partition_method_mapping():
    from mgt_scale.parallel.pipeline import ds_partition_method
    assert ds_partition_method("type:Block") == "type:BlockPipe"
    assert ds_partition_method("parameters") == "parameters"
    assert ds_partition_method("uniform") == "uniform"
