# `parallel.mode: zero` is the ZeRO engine's canonical name (stages 1-3); `zero3`, its old name, is
# accepted and normalised at config load, and checkpoints whose manifest says `zero3` still resume and
# export as ZeRO checkpoints.
import json

import pytest

from mgt_scale.config import ParallelConfig, canonical_mode, load_config, save_config

SYN = ["data.synthetic=random"]


@pytest.mark.parametrize("given", ["zero", "zero3"])
def test_zero3_is_read_as_zero_and_saved_as_zero(given, tmp_path):
    cfg = load_config(None, [*SYN, f"parallel.mode={given}"])
    assert cfg.parallel.mode == "zero"
    save_config(cfg, tmp_path / "c.yaml")
    assert "mode: zero\n" in (tmp_path / "c.yaml").read_text()
    assert load_config(tmp_path / "c.yaml").parallel.mode == "zero"


def test_shipped_configs_saying_zero3_load_as_zero():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "configs"
    assert load_config(root / "demo.yaml").parallel.mode == "zero"


def test_canonical_mode_and_a_config_built_in_code():
    assert canonical_mode("zero3") == canonical_mode("zero") == "zero"
    assert canonical_mode("pipeline") == "pipeline"
    assert ParallelConfig(mode="zero3").mode == "zero"
    with pytest.raises(Exception, match="parallel.mode"):
        load_config(None, [*SYN, "parallel.mode=zero2"])


def test_deepspeed_config_of_the_zero_mode_has_the_zero_section():
    from mgt_scale.parallel.ds_config import deepspeed_config
    from mgt_scale.parallel.topology import plan_batch
    cfg = load_config(None, [*SYN, "parallel.mode=zero3", "parallel.profile=cpu"])
    assert deepspeed_config(cfg, plan_batch(cfg, 1), "fp32")["zero_optimization"]["stage"] == 3


def test_old_zero3_manifest_has_the_layout_of_a_zero_run(tmp_path):
    from mgt_scale.checkpoint.manager import CheckpointManager
    cfg = load_config(None, SYN)
    manager = CheckpointManager(str(tmp_path), cfg, rank=0, world_size=1)
    for mode in ("zero3", "zero"):
        assert manager.same_layout({"world_size": 1, "mode": mode})
    assert not manager.same_layout({"world_size": 1, "mode": "pipeline", "pipeline_stages": 2})


@pytest.mark.parametrize("mode", ["zero", "zero3"])
def test_offline_consolidation_reads_zero_and_zero3_checkpoints_as_zero(mode, tmp_path, monkeypatch):
    import torch
    from deepspeed.utils import zero_to_fp32

    from mgt_scale.train.model_source import consolidated_from_checkpoint
    tag = tmp_path / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag / "mgt_manifest.json").write_text(json.dumps({"mode": mode, "world_size": 1}))
    read = []
    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda d, tag: read.append(tag) or {"embed.tok.weight": torch.ones(2)})
    sd = consolidated_from_checkpoint(tag, load_config(None, SYN))
    assert read == ["step_00000001"] and list(sd) == ["embed.tok.weight"]
