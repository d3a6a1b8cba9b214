# A checkpoint found damaged is set aside to checkpoints/damaged/<time>-step_N/ with a reason.txt, never
# deleted, also when its step is saved again after a rollback past it (review finding: the re-save moved
# it to .step_N.replaced and deleted that once the new save was complete). CheckpointManager with a
# stand-in engine, one process; slow: the real ZeRO-3 engine, and a re-save by 2 gloo ranks.
from pathlib import Path

import pytest

from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, tag_for, verify_checkpoint
from mgt_scale.checkpoint.retention import DAMAGED, REASON

from test_checkpoint_retention import StandInEngine, flip, manager


def aside(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints" / DAMAGED
    return sorted(d.iterdir()) if d.is_dir() else []


def test_a_checkpoint_rejected_by_a_rollback_is_set_aside_not_deleted_when_its_step_is_saved_again(tmp_path):
    m = manager(tmp_path)
    for step in (2, 4):
        m.save(StandInEngine(), step, {})
    ck = tmp_path / "checkpoints"
    flip(ck / tag_for(4) / "optim_states.pt")  # same size: only the hash tells
    # the rollback (non-finite streak / collapse policy) in the same process: find_resume passes over 4
    assert m.find_resume() == ck / tag_for(2)
    seen = []

    class Watching(StandInEngine):
        def save(self, save_dir, tag, client_state):
            super().save(save_dir, tag, client_state)
            seen.append(verify_checkpoint(ck / (ck / LATEST).read_text().strip()))
    m.save(Watching(), 4, {})  # training reaches step 4 again
    assert seen == [[]]  # latest_good named a good checkpoint (step 2) while step 4 was written
    moved = aside(tmp_path)
    assert len(moved) == 1 and moved[0].name.endswith("-" + tag_for(4))
    assert "sha256 mismatch" in (moved[0] / REASON).read_text()
    assert verify_checkpoint(moved[0] / tag_for(4)) != []  # untouched: still the damaged bytes
    assert verify_checkpoint(ck / tag_for(4)) == []
    assert (ck / LATEST).read_text().strip() == tag_for(4)
    assert m.steps() == [2, 4]


def test_a_replaced_checkpoint_that_fails_the_size_check_is_set_aside(tmp_path):
    # a process that never verified it (no rollback here): the cheap check before deleting finds it
    m = manager(tmp_path)
    m.save(StandInEngine(), 4, {})
    shard = tmp_path / "checkpoints" / tag_for(4) / "optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    manager(tmp_path).save(StandInEngine(), 4, {})
    moved = aside(tmp_path)
    assert len(moved) == 1 and (moved[0] / tag_for(4) / MANIFEST).is_file()
    assert "size 100" in (moved[0] / REASON).read_text()
    assert verify_checkpoint(tmp_path / "checkpoints" / tag_for(4)) == []


def test_recovery_sets_aside_a_damaged_kept_copy_instead_of_deleting_it(tmp_path):
    # a kill left a kept copy (.step_N.replaced) beside a complete new save; the kept copy is damaged
    m = manager(tmp_path)
    m.save(StandInEngine(), 4, {})
    ck = tmp_path / "checkpoints"
    (ck / tag_for(4)).rename(ck / f".{tag_for(4)}.replaced")
    (ck / f".{tag_for(4)}.replaced" / "optim_states.pt").write_bytes(b"x")
    m.save(StandInEngine(), 4, {})
    assert manager(tmp_path).recover_interrupted_saves() == []
    moved = aside(tmp_path)
    assert len(moved) == 1 and "size 1 " in (moved[0] / REASON).read_text()
    assert not (ck / f".{tag_for(4)}.replaced").exists()


@pytest.mark.slow
def test_a_deepspeed_resave_is_written_beside_the_step_and_loads(inprocess_dist, tmp_path):
    """The real engine (ZeRO-3, fp32 CPU, one in-process rank): the new save of a step goes to
    checkpoints/.resave/step_N under DeepSpeed's tag step_N, each file recorded by its writer, and what
    is swapped in verifies in full and loads the new weights."""
    import torch

    from mgt_scale.config import load_config
    from mgt_scale.parallel.convert import consolidated_state_dict
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.checkpoint.manager import CheckpointManager
    from mgt_scale.checkpoint.manifest import read_manifest
    from mgt_scale.engine.zero import ZeroEngine
    cfg = load_config(None, ["data.synthetic=copy", "model.num_layers=2", "model.d_model=32", "model.num_heads=4",
                             "model.d_ff=64", "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16",
                             "monitor.interval=0", "train.global_batch_size=4", "train.micro_batch_size=2",
                             "parallel.precision=fp32", "checkpoint.keep_last=2"])
    e = ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")
    e.set_lr(1e-2)
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))] * 2
    m = CheckpointManager(str(tmp_path), cfg, rank=0, world_size=1)
    m.save(e, 2, {"loader": {"consumed": 8}})
    ck = tmp_path / "checkpoints"
    first = (ck / tag_for(2) / MANIFEST).read_text()
    e.train_step(batch)
    want = {k: v.clone() for k, v in consolidated_state_dict(e).items()}
    m.save(e, 2, {"loader": {"consumed": 16}})  # the step again, after a rollback to it
    assert (ck / tag_for(2) / MANIFEST).read_text() != first
    assert verify_checkpoint(ck / tag_for(2), full=True) == []
    assert not (ck / ".resave").exists() and not (ck / f".{tag_for(2)}.replaced").exists()
    assert m.completed_steps() == [2] and (ck / LATEST).read_text().strip() == tag_for(2)
    files = read_manifest(ck / tag_for(2))["files"]
    assert any(rec.get("rank") == 0 and "optim" in rel for rel, rec in files.items())  # hashed by its writer
    e.train_step(batch)
    state = m.load(e, m.find_resume())
    assert state["loader"] == {"consumed": 16}
    got = consolidated_state_dict(e)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _resave_worker(rank, world, port, run_dir, out):
    import json

    import torch.distributed as dist

    from mgt_scale.config import load_config
    from mgt_scale.checkpoint.manager import CheckpointManager
    from test_checkpoint_scale import StandInEngine as RankEngine
    from test_checkpoint_scale import _init
    _init(rank, world, port)
    cfg = load_config(None, ["data.synthetic=copy", "checkpoint.keep_last=2"])
    m = CheckpointManager(run_dir, cfg, rank, world)
    m.save(RankEngine(rank, 1.0), 4, {})
    m.save(RankEngine(rank, 2.0), 4, {})  # the step again (after a rollback): every rank writes beside it
    Path(out, f"rank{rank}.json").write_text(json.dumps({"resume": m.find_resume().name}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_write_a_resave_beside_the_step_and_it_is_swapped_in_whole(tmp_path):
    import json

    import torch

    from test_checkpoint_scale import _spawn
    world, out = 2, tmp_path / "out"
    out.mkdir()
    _spawn(_resave_worker, world, str(tmp_path / "run"), str(out))
    ck = tmp_path / "run" / "checkpoints"
    assert [json.loads((out / f"rank{r}.json").read_text())["resume"] for r in range(world)] == [tag_for(4)] * world
    assert verify_checkpoint(ck / tag_for(4)) == [] and not (ck / ".resave").exists()
    files = json.loads((ck / tag_for(4) / MANIFEST).read_text())["files"]
    for r in range(world):
        assert files[f"shard_rank{r}.pt"]["rank"] == r
        assert torch.load(ck / tag_for(4) / f"shard_rank{r}.pt")["w"][0].item() == 2.0  # the new save's


def test_setting_a_replaced_checkpoint_aside_is_a_warning_on_stderr(tmp_path, capsys):
    """Before: print()ed to stdout (no `warning:`, no rank prefix, and not silenced by MGT_LOG_LEVEL)."""
    from mgt_scale.logs import setup_logging
    setup_logging(rank=0, world=1, level="INFO", all_ranks=False)
    m = manager(tmp_path)
    m.save(StandInEngine(), 4, {})
    shard = tmp_path / "checkpoints" / tag_for(4) / "optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    manager(tmp_path).save(StandInEngine(), 4, {})
    out, err = capsys.readouterr()
    assert len(aside(tmp_path)) == 1
    assert "failed verification" not in out
    assert any(line.startswith("warning: checkpoint step_") and "failed verification" in line
               for line in err.splitlines()), err
