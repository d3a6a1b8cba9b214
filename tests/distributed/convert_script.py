# Run on 2 ranks by test_engines_pipeline.py: zero3 -> consolidated fp32 -> pipeline (2 stages), and
# back. Writes {"zero3_eval", "pipe_eval_loaded", "pipe_eval_trained", "zero3_eval_loaded"} to argv[2].
from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.distributed as dist

from mgt_scale.cluster.dist_env import apply, derive_dist_env
from mgt_scale.config import load_config
from mgt_scale.data import build_train_loader, build_valid_batches
from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed
from mgt_scale.parallel.convert import consolidated_state_dict, load_consolidated
from mgt_scale.parallel.topology import plan_batch
from mgt_scale.engine.zero import ZeroEngine
from mgt_scale.engine.pipeline import PipelineEngine
from mgt_scale.train.schedule import lr_at


def train(engine, cfg, plan, steps):
    loader = build_train_loader(cfg.data, seq_len=cfg.data.seq_len, global_batch=plan.global_batch,
                                micro_batch=plan.micro_batch, dp_rank=engine.dp_rank, dp_size=engine.dp_size,
                                vocab_size=cfg.model.vocab_size, prefetch=0)
    for step in range(steps):
        engine.set_lr(lr_at(cfg.train, step))
        engine.train_step(loader.next_step())
    loader.close()


def main() -> None:
    base = load_config(sys.argv[1])
    denv = derive_dist_env()
    apply(denv)
    init_distributed(import_deepspeed())
    world = dist.get_world_size()
    zcfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, mode="zero3", zero_stage=3,
                                                                  pipeline_stages=1))
    pcfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, mode="pipeline", zero_stage=0,
                                                                  pipeline_stages=2))
    zplan, pplan = plan_batch(zcfg, world), plan_batch(pcfg, world)
    valid = build_valid_batches(base.data, base.data.seq_len, base.train.micro_batch_size, 2, base.model.vocab_size)
    out = {}
    z = ZeroEngine(zcfg, zplan, "fp32")
    train(z, zcfg, zplan, 3)
    out["zero3_eval"] = z.eval_loss(valid)
    sd = consolidated_state_dict(z)
    p = PipelineEngine(pcfg, pplan, "fp32")
    out["pipe_eval_fresh"] = p.eval_loss(valid)
    load_consolidated(p, sd)
    out["pipe_eval_loaded"] = p.eval_loss(valid)
    train(p, pcfg, pplan, 3)
    out["pipe_eval_trained"] = p.eval_loss(valid)
    sd2 = consolidated_state_dict(p)
    out["same_keys"] = sorted(sd2) == sorted(sd)
    load_consolidated(z, sd2)
    out["zero3_eval_loaded"] = z.eval_loss(valid)
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(out, f)
    dist.barrier()


if __name__ == "__main__":
    main()
