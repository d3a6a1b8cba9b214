# The GPU profile of the DeepSpeed config (mgt_scale/parallel/gpu_profile.py): the sizes it derives from
# the model and the job's shape, every key it emits read back by DeepSpeed 0.19.8's own config parser
# (a misspelt key would be ignored or refused there), the CPU profile left as the gloo bench measured
# it, and `mgt train --dry-run --nodes N --gpus-per-node G` printing the plan and JSON of such a job.
import json

import pytest
import torch

from mgt_scale.config import load_config
from mgt_scale.parallel.ds_config import deepspeed_config
from mgt_scale.parallel.gpu_profile import JobShape, detect_profile, unit_params
from mgt_scale.parallel.topology import plan_batch

BIG = ["data.synthetic=random", "model.num_layers=200", "model.d_model=2048", "model.num_heads=16",
       "model.d_ff=8192", "model.vocab_size=32000", "model.max_seq_len=2048", "data.seq_len=2048",
       "train.global_batch_size=1024", "train.micro_batch_size=2", "monitor.interval=0"]
BLOCK_2048 = 67_129_346  # 12 d^2 (attention + FFN at d_ff = 4d) + 4 d^2 (MGT gate/beta) + 2 x 10241 vectors


def parsed(ds: dict, dp: int):
    """DeepSpeed 0.19.8's reading of the dict (ZeRO keys are a pydantic model that forbids unknown ones).
    Without a process group it checks the batch against one rank: the global batch is scaled to that."""
    from deepspeed.runtime.config import DeepSpeedConfig
    assert ds["train_batch_size"] % dp == 0
    return DeepSpeedConfig(dict(ds, train_batch_size=ds["train_batch_size"] // dp))


def gpu_json(overrides, nodes, gpus, precision="bf16"):
    cfg = load_config(None, [*BIG, *overrides])
    plan = plan_batch(cfg, nodes * gpus)
    return cfg, plan, deepspeed_config(cfg, plan, precision, "gpu", JobShape(nodes, gpus))


def test_block_count_is_the_flops_count_plus_vectors():
    cfg = load_config(None, BIG).model
    assert unit_params(cfg)["block"] == BLOCK_2048


def test_64_gpus_d2048_200_layers():
    _, plan, ds = gpu_json([], 8, 8)
    z = ds["zero_optimization"]
    assert z["overlap_comm"] is True
    assert z["stage3_prefetch_bucket_size"] == 2 * BLOCK_2048 > 5e7  # above DeepSpeed's default, one block+
    assert z["reduce_bucket_size"] == BLOCK_2048
    assert z["stage3_max_live_parameters"] == 10 ** 9 >= 3 * BLOCK_2048
    assert z["stage3_param_persistence_threshold"] == 10 * 2048
    assert z["zero_hpz_partition_size"] == 8
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    c = parsed(ds, plan.data_parallel)
    zc = c.zero_config
    assert (zc.overlap_comm, zc.prefetch_bucket_size, zc.reduce_bucket_size, zc.max_live_parameters,
            zc.param_persistence_threshold, zc.zero_hpz_partition_size) == \
        (True, 2 * BLOCK_2048, BLOCK_2048, 10 ** 9, 20480, 8)
    assert c.grad_accum_dtype == "fp32" and c.communication_data_type == torch.float32


def test_one_node_d1024_no_hierarchy():
    cfg, plan, ds = gpu_json(["model.d_model=1024", "model.d_ff=4096", "model.num_layers=48"], 1, 8)
    block = unit_params(cfg.model)["block"]
    assert block == 16 * 1024 ** 2 + 2 * (5 * 1024 + 1)
    z = ds["zero_optimization"]
    assert "zero_hpz_partition_size" not in z
    # the LM head (32000 x 1024 + its norm = 3.3e7) is the largest unit at d=1024 (a block is 1.7e7)
    head = 32000 * 1024 + 2 * 1024
    assert z["stage3_prefetch_bucket_size"] == 2 * head and z["overlap_comm"] is True
    assert parsed(ds, plan.data_parallel).zero_config.prefetch_bucket_size == 2 * head


def test_hierarchical_partition_off_and_offload():
    assert "zero_hpz_partition_size" not in gpu_json(["parallel.hierarchical_partition=none"], 8, 8)[2]["zero_optimization"]
    assert "zero_hpz_partition_size" not in gpu_json(["parallel.offload_params=cpu"], 8, 8)[2]["zero_optimization"]


@pytest.mark.parametrize("overrides,precision", [
    (["parallel.zero_stage=2"], "bf16"), (["parallel.zero_stage=1"], "fp32"),
    (["parallel.mode=pipeline", "parallel.zero_stage=1", "parallel.pipeline_stages=8"], "bf16"),
    (["parallel.mode=pipeline", "parallel.zero_stage=0", "parallel.pipeline_stages=8"], "fp32")])
def test_every_mode_parses(overrides, precision):
    cfg, plan, ds = gpu_json(overrides, 8, 8, precision)
    c = parsed(ds, plan.data_parallel)
    z = ds["zero_optimization"]
    if cfg.parallel.zero_stage in (1, 2):
        assert c.zero_config.allgather_bucket_size == z["allgather_bucket_size"] == BLOCK_2048
    assert c.grad_accum_dtype == ("fp32" if precision == "bf16" else None)


def test_pipeline_zero0_bf16_refused_on_gpus():
    with pytest.raises(ValueError, match="parallel.zero_stage=1"):
        gpu_json(["parallel.mode=pipeline", "parallel.zero_stage=0", "parallel.pipeline_stages=8"], 8, 8)


def test_cpu_profile_unchanged_and_auto_is_cpu_without_cuda():
    cfg = load_config(None, [*BIG, "parallel.profile=auto"])
    assert detect_profile("auto") == "cpu"  # no CUDA on the test bench
    z = deepspeed_config(cfg, plan_batch(cfg, 2), "fp32")["zero_optimization"]
    assert z == {"stage": 3, "contiguous_gradients": True, "overlap_comm": False,
                 "stage3_gather_16bit_weights_on_model_save": False, "reduce_scatter": True,
                 "memory_efficient_linear": True}
    # bf16 under the cpu profile keeps DeepSpeed's defaults (how a run saved before the gpu profile resumes)
    assert "data_types" not in deepspeed_config(cfg, plan_batch(cfg, 2), "bf16", "cpu")


def dry_run(tmp_path, capsys, *args, sets=()):
    from mgt_scale.train.entry import main
    cfg = tmp_path / "big.yaml"
    cfg.write_text("monitor: {interval: 0}\n")
    code = main(["--config", str(cfg), *[a for s in (*BIG, *sets) for a in ("--set", s)], "--dry-run", *args])
    return code, capsys.readouterr()


def test_dry_run_plans_a_64_gpu_job(tmp_path, capsys):
    code, out = dry_run(tmp_path, capsys, "--nodes", "8", "--gpus-per-node", "8")
    assert code == 0, out.err
    ds = json.loads(out.out.split("# DeepSpeed config\n", 1)[1])
    assert ds["train_batch_size"] == 1024 and ds["gradient_accumulation_steps"] == 8  # 1024 / (2 x 64)
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 8 and ds["bf16"]["enabled"] is True
    assert "job: 8 node(s) x 8 GPU(s) = world 64" in out.out


def test_dry_run_pipeline_shows_partition_and_refuses_a_short_batch(tmp_path, capsys):
    pipe = ["parallel.mode=pipeline", "parallel.zero_stage=1", "parallel.pipeline_stages=8"]
    code, out = dry_run(tmp_path, capsys, "--nodes", "8", sets=pipe)
    assert code == 0, out.err
    assert out.out.count("% of FLOPs") == 8 and "bubble" in out.out
    code, out = dry_run(tmp_path, capsys, "--nodes", "8", sets=[*pipe, "train.global_batch_size=64"])
    assert code == 2 and "parallel.pipeline_stages=8" in out.err  # 64 / (2 x 8) = 4 micro batches < 8 stages


def test_shape_only_with_dry_run(tmp_path, capsys):
    from mgt_scale.train.entry import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {synthetic: copy}\nmonitor: {interval: 0}\n")
    assert main(["--config", str(cfg), "--nodes", "2"]) == 2
    assert main(["--config", str(cfg), "--dry-run", "--nodes", "0"]) == 2


# -- memory: hpZ only where its secondary copy fits; bucket sizes capped -----------------------------
# 192 x d 8192 (2.1e11 parameters) on 64 nodes x 8 GPUs: model states 7 GB per GPU, but hpZ's copy
# (2 bytes x params / 8 GPUs) 52 GB
HUGE = ["model.num_layers=192", "model.d_model=8192", "model.num_heads=64", "model.d_ff=32768"]


def plan_of(out: str) -> tuple[str, dict]:
    text = out.split("# plan\n", 1)[1]
    plan, ds = text.split("# DeepSpeed config\n", 1)
    return plan, json.loads(ds)


def test_dry_run_of_a_small_model_keeps_hpz_and_prints_the_memory_estimate(tmp_path, capsys):
    code, out = dry_run(tmp_path, capsys, "--nodes", "8", "--gpus-per-node", "8")
    assert code == 0, out.err
    plan, ds = plan_of(out.out)
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 8
    assert "memory per GPU (estimate" in plan and "budget 60.0 GB (0.75 x 80 GB)" in plan


def test_dry_run_of_a_huge_model_turns_hpz_off_for_memory_and_caps_the_buckets(tmp_path, capsys):
    from mgt_scale.parallel import gpu_profile as G
    code, out = dry_run(tmp_path, capsys, "--nodes", "64", "--gpus-per-node", "8", sets=HUGE)
    assert code == 0, out.err
    plan, ds = plan_of(out.out)
    z = ds["zero_optimization"]
    assert "zero_hpz_partition_size" not in z  # before: 8, a 52 GB copy per GPU on top of the rest
    assert "hierarchical partition: none (memory: estimated" in plan
    # before: reduce 1.07e9 (2 x 4.3 GB fp32 buckets), prefetch 2.1e9, live 3.2e9 parameters
    assert z["reduce_bucket_size"] == G.REDUCE_BUCKET_CAP == 5 * 10 ** 8
    assert z["stage3_prefetch_bucket_size"] == G.PREFETCH_CAP
    assert z["stage3_max_live_parameters"] == G.MAX_LIVE_CAP
    zc = parsed(ds, 512).zero_config  # DeepSpeed reads the capped keys
    assert (zc.reduce_bucket_size, zc.prefetch_bucket_size) == (5 * 10 ** 8, 10 ** 9)
    cfg = load_config(None, [*BIG, *HUGE])
    m = G.memory_estimate(cfg, plan_batch(cfg, 512), JobShape(64, 8))
    assert m.total(False) <= m.budget < m.total(True)
    # a GPU with more memory (parallel.gpu_memory_gb: H200 141 GB) keeps hpZ
    code, out = dry_run(tmp_path, capsys, "--nodes", "64", "--gpus-per-node", "8",
                        sets=[*HUGE, "parallel.gpu_memory_gb=141"])
    assert code == 0 and plan_of(out.out)[1]["zero_optimization"]["zero_hpz_partition_size"] == 8


def test_zero2_allgather_bucket_is_capped():
    cfg, plan, ds = gpu_json([*HUGE, "parallel.zero_stage=2"], 64, 8)
    assert ds["zero_optimization"]["allgather_bucket_size"] == 5 * 10 ** 8
