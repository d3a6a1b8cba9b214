# The DeepSpeed JSON is built once, by `mgt train` (entry.main: the config, the batch plan, the precision,
# the GPU profile and the job shape), validated and printed by --dry-run, and handed through
# train/build.py to the engine, which initialises DeepSpeed with that very dict. The engine used to build
# its own from the environment after dist_env.apply: under srun (no LOCAL_WORLD_SIZE until apply) a rank
# of a 2-node job validated and printed the JSON of one node, and ran with another (the hierarchical
# partition `zero_hpz_partition_size` of the GPU profile on, in the run only). In-process: rank 0 of a
# simulated srun job of 2 nodes x 2 tasks; deepspeed.initialize is replaced to capture its `config`.
import json

import pytest

from mgt_scale import exit_codes

SETS = ["data.synthetic=random", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
        "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16", "monitor.interval=0",
        "train.global_batch_size=8", "train.micro_batch_size=2", "parallel.precision=fp32",
        "parallel.profile=gpu", "parallel.zero_stage=3", "parallel.hierarchical_partition=node"]


class _Captured(Exception):
    pass


def srun_rank0(monkeypatch) -> None:
    """The environment srun gives rank 0 of 2 nodes x 2 tasks (no RANK/WORLD_SIZE/LOCAL_WORLD_SIZE)."""
    from mgt_scale.cluster.dist_env import LAUNCHER_VAR
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", LAUNCHER_VAR):
        monkeypatch.delenv(k, raising=False)  # apply() sets them: monkeypatch restores them after the test
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # kept by derive_dist_env: no scontrol
    monkeypatch.setenv("MASTER_PORT", __import__("os").environ.get("MASTER_PORT", "29500"))
    for k, v in {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
                 "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(k, v)


@pytest.mark.slow
def test_the_engine_initialises_deepspeed_with_the_json_dry_run_prints(inprocess_dist, tmp_path, monkeypatch,
                                                                       capsys):
    from mgt_scale.engine import zero
    from mgt_scale.model import build_model
    from mgt_scale.parallel.ds_runtime import import_deepspeed
    from mgt_scale.train import entry, preemption
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run: {{dir: {tmp_path / 'run'}}}\n")
    argv = ["--config", str(cfg), *[a for s in SETS for a in ("--set", s)]]
    srun_rank0(monkeypatch)

    assert entry.main(argv + ["--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out.split("# DeepSpeed config\n", 1)[1])
    assert printed["zero_optimization"].get("zero_hpz_partition_size") == 2  # 2 nodes x 2 GPUs

    captured = {}

    def initialize(model=None, optimizer=None, config=None, **kwargs):
        captured["config"] = config
        raise _Captured
    monkeypatch.setattr(import_deepspeed(), "initialize", initialize)
    # the partitioned build would use the hierarchical partition on this one-rank group: a plain model
    monkeypatch.setattr(zero, "build_model_zero_init", lambda c, ds: build_model(c.model, seed=c.train.seed))
    monkeypatch.setattr(preemption, "install_signal_handlers", lambda: None)
    assert entry.main(argv) == exit_codes.CRASH  # _Captured: the engine stops at deepspeed.initialize
    assert captured["config"] == printed
