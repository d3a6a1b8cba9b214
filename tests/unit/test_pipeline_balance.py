# Pipeline stages cut by training FLOPs (mgt_scale/parallel/pipeline.py): the balanced partition is the
# optimum, the 200-layer d=2048 stack's stages carry equal FLOPs within a bound (embedding and head
# counted), the given boundaries reach DeepSpeed's PipelineModule; fewer micro batches than stages is
# refused and a large bubble warned about; and in bf16 pipeline mode (the GPU profile: ZeRO-1, fp32
# gradient accumulation) a non-finite step is skipped (tiny tensors: bf16 matmuls are slow on CPUs).
import itertools
import math
import random

import pytest
import torch

from mgt_scale.config import ConfigError, load_config
from mgt_scale.parallel.pipeline import balanced_partition, flops_partition, layer_costs, partition_costs
from mgt_scale.parallel.topology import bubble_fraction, bubble_warning, plan_batch

BIG = ["data.synthetic=random", "model.num_layers=200", "model.d_model=2048", "model.num_heads=16",
       "model.d_ff=8192", "model.vocab_size=32000", "model.max_seq_len=2048", "data.seq_len=2048",
       "train.global_batch_size=1024", "train.micro_batch_size=2", "monitor.interval=0",
       "parallel.mode=pipeline", "parallel.zero_stage=1", "parallel.pipeline_stages=8"]


def brute_force_max(costs, stages):
    n = len(costs)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), stages - 1):
        b = [0, *cuts, n]
        best = min(best, max(sum(costs[b[i]:b[i + 1]]) for i in range(stages)))
    return best


def test_balanced_partition_is_optimal():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        stages = rng.randint(1, n)
        costs = [rng.choice([0, 1, 2, 5, 9, 30]) for _ in range(n)]
        b = balanced_partition(costs, stages)
        assert b[0] == 0 and b[-1] == n and len(b) == stages + 1
        assert all(b[i] < b[i + 1] for i in range(stages)), (costs, b)  # no empty stage
        assert max(sum(costs[b[i]:b[i + 1]]) for i in range(stages)) == brute_force_max(costs, stages)


def test_200_layers_8_stages_balanced_by_flops():
    cfg = load_config(None, BIG)
    costs = layer_costs(cfg.model, cfg.data.seq_len)
    assert costs[0] == 0 and costs[-1] == 6 * 32000 * 2048 and len(costs) == 202  # embedding, head counted
    parts = flops_partition(cfg, 8)
    per_stage = partition_costs(cfg, parts)
    mean = sum(per_stage) / 8
    assert max(per_stage) / mean < 1.035  # 25 blocks per stage; the last one also carries the head
    # DeepSpeed's "parameters" counts the embedding by its parameters, not its FLOPs (a lookup: ~0). With a
    # 128k vocabulary (embedding = 3.9 blocks' parameters) on 4 stages of 32 blocks, stage 0 gets 4 blocks
    # fewer and the others carry them: the slowest stage 12.8 % above the mean, against 1.5 % by FLOPs.
    from deepspeed.runtime.utils import partition_balanced

    from mgt_scale.parallel.pipeline import layer_params
    cfg = load_config(None, [*BIG, "model.vocab_size=128000", "model.num_layers=32", "parallel.pipeline_stages=4"])
    per_stage = partition_costs(cfg, flops_partition(cfg, 4))
    by_params = partition_costs(cfg, partition_balanced(weights=layer_params(cfg.model), num_parts=4))
    mean = sum(per_stage) / 4
    assert max(per_stage) / mean < 1.02 and max(by_params) / mean > 1.12


def test_given_partition_reaches_the_module():
    """The PipelineModule subclass takes the boundaries as given (DeepSpeed's __init__ calls
    _partition_layers once; here on a bare instance with a 2-stage topology, no process group)."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from mgt_scale.parallel.pipeline import _given_partition_class
    cls = _given_partition_class()
    m = cls.__new__(cls)
    for k, v in dict(_given_parts=[0, 3, 5], num_stages=2, _layer_specs=[None] * 5,
                     _topo=PipeDataParallelTopology(num_pp=2, num_dp=1), global_rank=1).items():
        object.__setattr__(m, k, v)
    m._partition_layers("parameters")
    assert m.parts == [0, 3, 5] and (m._local_start, m._local_stop) == (3, 5)
    object.__setattr__(m, "_given_parts", [0, 3, 4])
    with pytest.raises(ValueError, match="does not fit"):
        m._partition_layers("parameters")


def test_fewer_micro_batches_than_stages_refused_and_bubble_warned():
    cfg = load_config(None, [*BIG, "train.global_batch_size=64"])  # 64 / (2 x dp 8) = 4 micro batches
    with pytest.raises(ConfigError, match="parallel.pipeline_stages=8 with 4 micro batch"):
        plan_batch(cfg, 64)
    cfg = load_config(None, [*BIG, "train.global_batch_size=128"])  # 8 micro batches: bubble 7/15
    plan = plan_batch(cfg, 64)
    assert bubble_fraction(8, plan.grad_accum) == pytest.approx(7 / 15)
    assert "pipeline bubble 47%" in bubble_warning(cfg, plan)
    assert bubble_warning(load_config(None, BIG), plan_batch(load_config(None, BIG), 64)) == ""  # 64: 9.9 %


TINY = ["data.synthetic=copy", "model.num_layers=1", "model.d_model=8", "model.num_heads=2", "model.d_ff=16",
        "model.vocab_size=16", "model.max_seq_len=8", "data.seq_len=4", "monitor.interval=0",
        "train.global_batch_size=2", "train.micro_batch_size=1", "parallel.mode=pipeline",
        "parallel.pipeline_stages=1", "parallel.zero_stage=1", "parallel.precision=bf16", "train.grad_clip=1.0",
        "parallel.profile=gpu"]


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 16, (1, 4), generator=g), torch.randint(0, 16, (1, 4), generator=g)) for _ in range(2)]


@pytest.mark.slow
def test_bf16_pipeline_accumulates_in_fp32_and_skips_nonfinite(inprocess_dist, fault_hooks):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from mgt_scale.engine.pipeline import PipelineEngine
    cfg = load_config(None, TINY)
    e = PipelineEngine(cfg, plan_batch(cfg, 1), "bf16")
    opt = e.engine.optimizer
    assert isinstance(opt, BF16_Optimizer) and opt.grad_acc_dtype == torch.float32 and e._guarded
    assert all(g.dtype == torch.float32 for g in opt.fp32_groups_gradients_flat)
    assert not e.train_step(batch(0)).skipped
    params = lambda: [p.detach().clone() for p in e.module.parameters()]  # noqa: E731
    before = params()
    with fault_hooks.nan_loss():  # NaN loss (the engine's lm_loss, tests/fault_hooks)
        assert e.train_step(batch(1)).skipped
    assert all(torch.equal(a, b) for a, b in zip(before, params()))
    # an inf gradient in one tensor from a finite loss: the norm is inf, the step skipped
    p = next(e.module.parameters())
    handle = p.register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        r = e.train_step(batch(2))
    finally:
        handle.remove()
    assert r.skipped and math.isfinite(r.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, params()))
    assert not e.train_step(batch(3)).skipped
    assert all(torch.isfinite(q.float()).all() for q in e.module.parameters())
