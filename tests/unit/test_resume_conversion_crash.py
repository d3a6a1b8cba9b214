# A reshard that fails at resume (DeepSpeed's ds_to_universal failing on a checkpoint that verified,
# checkpoint/universal.py ConversionError) is a crash: exit_codes.CRASH (1, retried a bounded number of
# times by the SLURM job script), status.json `failed` with exit code 1. It used to become a
# CheckpointError -> InputError -> exit 2 (a config error: no requeue, the job chain stopped for good).
# A damaged checkpoint stays bad input (exit 2). In-process: the converter is monkeypatched to fail.
from types import SimpleNamespace

import pytest
import torch

from mgt_scale import exit_codes
from mgt_scale.checkpoint.manifest import CheckpointError
from mgt_scale.checkpoint.universal import ConversionError
from mgt_scale.config import load_config

OVR = ["data.synthetic=copy", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
       "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16", "monitor.interval=0",
       "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.precision=fp32"]


@pytest.mark.slow
@pytest.mark.parametrize("fault,kind", [(ConversionError, ConversionError), (CheckpointError, CheckpointError)],
                         ids=["converter-failed", "damaged"])
def test_manager_load_keeps_a_conversion_failure_a_conversion_error(inprocess_dist, tmp_path, monkeypatch,
                                                                      fault, kind):
    from mgt_scale.checkpoint import manager as manager_mod
    from mgt_scale.checkpoint.manager import CheckpointManager
    from mgt_scale.engine.zero import ZeroEngine
    from mgt_scale.parallel.topology import plan_batch
    cfg = load_config(None, OVR + [f"run.dir={tmp_path}"])
    e = ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")
    g = torch.Generator().manual_seed(0)
    e.train_step([(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))])
    tag = CheckpointManager(str(tmp_path), cfg, 0, 1).save(e, 1, {})

    def failing(tag_dir, **kwargs):
        raise fault(f"{tag_dir}: ds_to_universal failed (exit 1)")
    monkeypatch.setattr(manager_mod, "make_universal", failing)
    # resumed as if by 2 ranks: the world size differs from the saved one, so the load reshards
    with pytest.raises(CheckpointError) as info:
        CheckpointManager(str(tmp_path), cfg, 0, 2).load(e, tag)
    assert type(info.value) is kind


class _Manager:
    """What build.resume asks of the checkpoint manager, with a load whose conversion fails."""

    def __init__(self, error: Exception):
        self.error = error

    def verify(self, tag_dir):
        return []

    def load(self, engine, tag_dir, log=None):
        raise self.error


@pytest.mark.parametrize("error,code", [(ConversionError("ds_to_universal failed (exit 1)"), exit_codes.CRASH),
                                        (CheckpointError("damaged: missing file"), exit_codes.CONFIG_ERROR)],
                         ids=["converter-failed", "damaged"])
def test_a_failed_conversion_at_resume_exits_as_a_crash(tmp_path, monkeypatch, error, code):
    import json

    from mgt_scale.checkpoint import manifest
    from mgt_scale.train import build, entry, preemption
    cfg = load_config(None, OVR + [f"run.dir={tmp_path / 'run'}"])
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    run = SimpleNamespace(manager=_Manager(error), trainer=None, engine=None, data_tokenizer={}, rank=0,
                          say=lambda msg: None)
    monkeypatch.setattr(build, "build", lambda *a, **k: run)
    monkeypatch.setattr(manifest, "data_tokenizer_problem", lambda *a: (None, None))
    monkeypatch.setattr(preemption, "install_signal_handlers", lambda: None)
    args = SimpleNamespace(resume=str(tag))
    got = entry.run(cfg, args, SimpleNamespace(rank=0), None, "fp32", {})
    assert got == code
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == code
