# Started on 2 ranks by the distributed conftest before any distributed test: DeepSpeed's process group
# comes up through our import path and one all-reduce gives the right sum. Exits non-zero otherwise.
import importlib

import torch
import torch.distributed as dist

from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed

deepspeed = import_deepspeed()
init_distributed(deepspeed)
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
assert t.item() == dist.get_world_size() * (dist.get_world_size() + 1) / 2, t
assert importlib.import_module("deepspeed.comm.comm").cdb.shm_comm_op is None, "DeepSpeed's CPU shm comm op was built"
print(f"preflight rank {dist.get_rank()} ok", flush=True)
# leave the group before exiting: a rank that exits with gloo's threads still up can abort ("terminate
# called without an active exception", exit -6), which CI saw once
dist.barrier()
dist.destroy_process_group()
