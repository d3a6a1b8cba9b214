# Checkpoint verification at scale (issue #30), with real gloo process groups of several ranks started
# in-process (torch.multiprocessing spawn, loopback) and a stand-in engine that writes its files through
# a DeepSpeed-like `engine.checkpoint_engine.save`, as DeepSpeed does:
# - the resume choice is rank 0's, broadcast: a rank whose view of the filesystem lags (it does not
#   see the newest checkpoint) still loads the same step; a file damaged on one rank's share makes
#   every rank fall back together;
# - hashing is shared: at save each rank hashes the files it wrote (rank 0 no longer hashes every
#   rank's files), at resume each file is hashed once in all (not once per rank);
# - parallel.dist_timeout_minutes reaches the process group: a barrier that one rank never joins
#   fails after the configured time.
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mgt_scale.cluster.dist_env import free_port
from mgt_scale.config import load_config

pytestmark = pytest.mark.slow  # ranks spawned per test, DeepSpeed imported in each
SHARD_FLOATS = 1 << 14  # 64 KiB per rank


class CountingSha:
    """hashlib.sha256 stand-in that counts the bytes hashed in this process."""
    hashed = 0

    def __init__(self, *a):
        self._h = _REAL_SHA(*a)

    def update(self, b):
        CountingSha.hashed += len(b)
        self._h.update(b)

    def hexdigest(self):
        return self._h.hexdigest()


import hashlib  # noqa: E402

_REAL_SHA = hashlib.sha256


class TorchWriter:
    """Like DeepSpeed's TorchCheckpointEngine: every shard goes through save(state_dict, path)."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)


class StandInEngine:
    def __init__(self, rank: int, value: float):
        self.rank = rank
        self.module = torch.nn.Linear(2, 2)
        self.engine = type("DS", (), {})()
        self.engine.checkpoint_engine = TorchWriter()
        self.weights = torch.full((SHARD_FLOATS,), value)

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        self.engine.checkpoint_engine.save({"w": self.weights}, str(d / f"shard_rank{self.rank}.pt"))


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _resume_worker(rank, world, port, run_dir, out, damage):
    _init(rank, world, port)
    hashlib.sha256 = CountingSha
    from mgt_scale.checkpoint.manager import CheckpointManager
    cfg = load_config(None, ["data.synthetic=copy", "checkpoint.keep_last=3"])
    m = CheckpointManager(run_dir, cfg, rank, world)
    for step in (2, 4):
        m.save(StandInEngine(rank, float(step)), step, {})
    saved_hashed = CountingSha.hashed
    dist.barrier()
    if damage and rank == 0:
        f = Path(run_dir) / "checkpoints" / "step_00000004" / f"shard_rank{world - 1}.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    dist.barrier()
    fresh = CheckpointManager(run_dir, cfg, rank, world)
    if rank == world - 1:  # this rank's view of the filesystem lags: it does not see step 4 yet
        fresh.steps = lambda: [2]
    CountingSha.hashed = 0
    tag = fresh.find_resume(log=lambda *a: None)
    fresh.set_aside_damaged(log=lambda *a: None)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"tag": tag.name, "save_hashed": saved_hashed,
                                                         "resume_hashed": CountingSha.hashed}))
    dist.destroy_process_group()


def _exit_after(rank, fn, world, port, *args):
    """Run one rank's worker, then leave without the interpreter's teardown: a rank that exits with
    gloo's threads up can abort in a C++ destructor ("terminate called without an active exception",
    SIGABRT) after its work is done and written, as mgt_scale.train.entry.exit_rank avoids for the trainer
    (seen here in CI). An exception in the worker still propagates: spawn reports it."""
    import os
    import sys
    fn(rank, world, port, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, world, *args):
    mp.start_processes(_exit_after, args=(fn, world, free_port(), *args), nprocs=world, start_method="spawn",
                       join=True)


def _results(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_ranks_that_disagree_about_the_filesystem_load_one_step_each_file_hashed_once(tmp_path):
    world = 3
    out = tmp_path / "out"
    out.mkdir()
    _spawn(_resume_worker, world, str(tmp_path / "run"), str(out), False)
    res = _results(out, world)
    assert [r["tag"] for r in res] == ["step_00000004"] * world  # before: the lagging rank took step 2
    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000004"
    manifest = json.loads((tag_dir / "mgt_manifest.json").read_text())
    total = sum(f.stat().st_size for f in tag_dir.iterdir() if f.name != "mgt_manifest.json")
    assert sum(v["size"] for v in manifest["files"].values()) == total
    # each rank's shard and RNG file is recorded as hashed by that rank
    for r in range(world):
        assert manifest["files"][f"shard_rank{r}.pt"]["rank"] == r
        assert manifest["files"][f"rng_rank{r:05d}.pt"]["rank"] == r
    # at resume every file is hashed once in all (before: once per rank), each rank its own share
    assert sum(r["resume_hashed"] for r in res) == total
    shard = (tag_dir / "shard_rank1.pt").stat().st_size
    assert res[1]["resume_hashed"] == shard + (tag_dir / "rng_rank00001.pt").stat().st_size  # its own files only
    # at save each rank hashed its own files (two saves); rank 0 did not hash the others' shards
    assert all(res[r]["save_hashed"] >= 2 * shard for r in range(world))
    assert res[0]["save_hashed"] < 2 * (total - shard)


def test_a_file_damaged_in_one_ranks_share_makes_every_rank_fall_back(tmp_path):
    world = 2
    out = tmp_path / "out"
    out.mkdir()
    _spawn(_resume_worker, world, str(tmp_path / "run"), str(out), True)
    assert [r["tag"] for r in _results(out, world)] == ["step_00000002"] * world
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest_good").read_text().strip() == "step_00000002"
    aside = list((ck / "damaged").iterdir())
    assert len(aside) == 1 and "sha256 mismatch" in (aside[0] / "reason.txt").read_text()


def _timeout_worker(rank, world, port, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed
    cfg = load_config(None, ["data.synthetic=copy", "parallel.dist_timeout_minutes=0.05"])  # 3 s
    init_distributed(import_deepspeed(), cfg.parallel.dist_timeout_minutes)
    dist.barrier()
    if rank == 1:
        time.sleep(30)  # never joins the next barrier in time
        return
    tic = time.time()
    try:
        dist.barrier()
        outcome = "completed"
    except RuntimeError as e:
        outcome = f"failed: {e}"[:200]
    Path(out, "rank0.json").write_text(json.dumps({"outcome": outcome, "seconds": time.time() - tic}))
    os._exit(0)


def test_the_configured_timeout_reaches_the_process_group(tmp_path):
    ctx = mp.start_processes(_timeout_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn",
                             join=False)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "rank0.json").is_file() and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for p in ctx.processes:
            p.kill()
            p.join()
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res["outcome"].startswith("failed"), res
    assert 2 <= res["seconds"] < 20, res  # the configured 3 s, not torch's 30-minute gloo default
