# The collective logic of the trainer and of checkpoint verification on real gloo groups of 2-3 ranks,
# started in-process by tests/unit/multirank.py (no DeepSpeed, no launcher; the session's `rank_pool`
# keeps them alive between tests):
# - parallel/collectives.py: any_rank, mean_over_ranks, all_reduce, collective_device;
# - checkpoint/collective.py: rank 0's resume choice broadcast to ranks that see other candidates,
#   the first problem of any rank on every rank, and verify_shared's gathered problem list, each file
#   hashed by one rank (its writer) unless `full`;
# - the helper itself: results in rank order, an exception named by rank (the pool restarts after it),
#   a hung collective timed out.
# Workers are module-level functions (spawn pickles them by name).
import time
from pathlib import Path

import pytest
import torch
from multirank import RankError, run_ranks


# ------------------------------------------------------------------ the helper
def _echo(rank, world):
    import torch.distributed as dist
    return {"rank": rank, "world": world, "dist_rank": dist.get_rank(), "dist_world": dist.get_world_size()}


def _raise_on_1(rank, world):
    if rank == 1:
        raise ValueError("bad value on purpose")
    return rank


def _hang_on_1(rank, world):
    import torch.distributed as dist
    if rank == 1:
        time.sleep(60)  # never joins the barrier
    dist.barrier()


def test_run_ranks_returns_each_ranks_value_in_rank_order(rank_pool):
    assert rank_pool(3).run(_echo) == [{"rank": r, "world": 3, "dist_rank": r, "dist_world": 3} for r in range(3)]


def test_run_ranks_names_the_rank_that_raised(rank_pool):
    with pytest.raises(RankError, match="rank 1: ValueError: bad value on purpose") as e:
        rank_pool(3).run(_raise_on_1)
    assert e.value.rank == 1 and "Traceback" in str(e.value)
    assert rank_pool(3).run(_echo)[2]["dist_rank"] == 2  # every rank answered: the group goes on


def test_run_ranks_starts_and_stops_its_own_ranks():
    assert run_ranks(_echo, 2) == [{"rank": r, "world": 2, "dist_rank": r, "dist_world": 2} for r in range(2)]


# ------------------------------------------------------------------ parallel/collectives.py
def _collectives(rank, world):
    from mgt_scale.parallel.collectives import all_reduce, any_rank, collective_device, mean_over_ranks
    t = torch.tensor([float(rank + 1)])
    summed = all_reduce(t)
    return {
        "device": str(collective_device()),
        "any_none": any_rank(False),
        "any_last": any_rank(rank == world - 1),
        "any_all": any_rank(True),
        "mean": mean_over_ranks(torch.tensor(float(rank + 1))),
        "mean_bf16": mean_over_ranks(torch.tensor(float(rank), dtype=torch.bfloat16)),
        "sum": summed.tolist(), "t_after": t.tolist(),  # t itself is left as it is
        "max": all_reduce(t, torch.distributed.ReduceOp.MAX).tolist(),
    }


def test_any_rank_mean_over_ranks_and_all_reduce_agree_on_every_rank(rank_pool):
    world = 3
    res = rank_pool(world).run(_collectives)
    for rank, r in enumerate(res):
        assert r["device"] == "cpu"
        assert (r["any_none"], r["any_last"], r["any_all"]) == (False, True, True)
        assert r["mean"] == pytest.approx(2.0) and r["mean_bf16"] == pytest.approx(1.0)
        assert r["sum"] == [6.0] and r["max"] == [3.0] and r["t_after"] == [float(rank + 1)]


# ------------------------------------------------------------------ checkpoint/collective.py
def _choose(rank, world):
    from mgt_scale.checkpoint.collective import choose_step
    asked = []

    def cheap_problems(step):
        asked.append(step)
        return [f"step {step}: manifest missing"] if step == 6 else []
    # rank 0 sees 6 (broken), 4, 2; the other ranks' views lag or differ: they must not matter
    candidates = [6, 4, 2] if rank == 0 else ([2] if rank == 1 else [])
    step, skipped = choose_step(candidates, cheap_problems, rank)
    return {"step": step, "skipped": skipped, "asked": asked}


def _choose_none(rank, world):
    from mgt_scale.checkpoint.collective import choose_step
    return choose_step([3, 1] if rank == 0 else [1], lambda s: ["bad"], rank)


def test_choose_step_is_rank_0s_choice_on_every_rank(rank_pool):
    res = rank_pool(3).run(_choose)
    for rank, r in enumerate(res):
        assert r["step"] == 4 and r["skipped"] == {6: ["step 6: manifest missing"]}
        assert r["asked"] == ([6, 4] if rank == 0 else [])  # only rank 0 runs the cheap checks
    assert rank_pool(3).run(_choose_none) == [(None, {3: ["bad"], 1: ["bad"]})] * 3


def _first_problem(rank, world):
    from mgt_scale.checkpoint.collective import first_problem
    mine = {0: None, 1: "rank 1: disk full", 2: "rank 2: unreadable"}[rank]
    return first_problem(mine), first_problem(None)


def test_first_problem_reaches_every_rank_so_all_raise_or_none(rank_pool):
    assert rank_pool(3).run(_first_problem) == [("rank 1: disk full", None)] * 3


def _write_checkpoint(rank, world, tag_dir):
    """Each rank writes and records its own shard; rank 0 adds an unclaimed file and the manifest."""
    import torch.distributed as dist
    from mgt_scale.checkpoint.manifest import file_record, write_manifest
    tag_dir = Path(tag_dir)
    tag_dir.mkdir(parents=True, exist_ok=True)
    shard = tag_dir / f"shard_rank{rank}.pt"
    shard.write_bytes(bytes([rank]) * 4096)
    every = [None] * world
    dist.all_gather_object(every, {shard.name: file_record(shard, rank)})
    if rank == 0:
        (tag_dir / "meta.json").write_text("{}")
        write_manifest(tag_dir, {"world_size": world}, {k: v for d in every for k, v in d.items()})
    dist.barrier()


def _verify(rank, world, tag_dir, damage, full, same_layout):
    import torch.distributed as dist
    from mgt_scale.checkpoint import manifest as ckpt_format
    from mgt_scale.checkpoint.collective import verify_shared
    _write_checkpoint(rank, world, tag_dir)
    if damage and rank == 0:  # same size, other bytes: only a hash finds it
        f = Path(tag_dir) / f"shard_rank{world - 1}.pt"
        f.write_bytes(b"\xff" * f.stat().st_size)
    dist.barrier()
    hashed = []
    real = ckpt_format.sha256_file
    ckpt_format.sha256_file = lambda p: hashed.append(Path(p).name) or real(p)
    try:
        problems = verify_shared(Path(tag_dir), rank, world, same_layout=same_layout, full=full)
    finally:
        ckpt_format.sha256_file = real  # the pool's next test runs in this process
    return {"problems": problems, "hashed": sorted(hashed)}


@pytest.mark.parametrize("damage", [False, True])
def test_verify_shared_hashes_each_file_once_and_gathers_the_problems(rank_pool, tmp_path, damage):
    world = 3
    res = rank_pool(world).run(_verify, str(tmp_path / "step_00000002"), damage, False, None)
    expected = [f"{tmp_path / 'step_00000002' / 'shard_rank2.pt'}: sha256 mismatch (corrupted)"] if damage else []
    assert [r["problems"] for r in res] == [expected] * world  # rank 2's finding, on every rank
    # each rank hashed its own shard; the unclaimed file is rank 0's; nothing twice
    assert [r["hashed"] for r in res] == [["meta.json", "shard_rank0.pt"], ["shard_rank1.pt"], ["shard_rank2.pt"]]


def test_verify_shared_full_hashes_every_file_on_every_rank(rank_pool, tmp_path):
    res = rank_pool(3).run(_verify, str(tmp_path / "step_00000002"), True, True, None)
    assert [r["hashed"] for r in res] == [["meta.json", "shard_rank0.pt", "shard_rank1.pt", "shard_rank2.pt"]] * 3
    assert all(len(r["problems"]) == 1 and "shard_rank2.pt: sha256 mismatch" in r["problems"][0] for r in res)


def test_verify_shared_in_another_layout_shares_round_robin(rank_pool, tmp_path):
    res = rank_pool(3).run(_verify, str(tmp_path / "step_00000002"), False, False, False)
    assert [r["hashed"] for r in res] == [["meta.json", "shard_rank2.pt"], ["shard_rank0.pt"], ["shard_rank1.pt"]]
    assert all(r["problems"] == [] for r in res)


def _verify_no_manifest(rank, world, tag_dir):
    from mgt_scale.checkpoint.collective import verify_shared
    Path(tag_dir).mkdir(parents=True, exist_ok=True)
    return verify_shared(Path(tag_dir), rank, world)


def test_verify_shared_names_a_missing_manifest_on_every_rank(rank_pool, tmp_path):
    res = rank_pool(3).run(_verify_no_manifest, str(tmp_path / "step_00000004"))
    assert res[0] == res[1] == res[2] and len(res[0]) == 1 and "mgt_manifest.json: missing" in res[0][0]


# last: it leaves the pool to be restarted at its next use
def test_a_collective_one_rank_never_joins_times_out_naming_the_ranks(rank_pool):
    tic = time.monotonic()
    with pytest.raises(RankError, match=r"rank 0: no result within 2 s \(ranks without one: \[0, 1, 2\]"):
        rank_pool(3).run(_hang_on_1, timeout=2)
    assert time.monotonic() - tic < 10  # killed, not left to gloo's 30-minute default
