# Retention never deletes a good checkpoint in favour of a damaged one (issue #28): a checkpoint that
# fails verification is moved to checkpoints/damaged/<time>-step_N/ with a reason.txt, and never counts
# towards checkpoint.keep_last. Before, `--resume auto` fell back from a damaged newest checkpoint to
# the older good one, and the next save's retention (keep_last 2: the two highest steps) deleted that
# good one and kept the damaged one. The rule on plain numbers (retention.plan_retention), the manager
# with a stand-in engine (no DeepSpeed), and end to end through `mgt train` (slow).
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgt_scale.config import load_config
from mgt_scale.checkpoint.manager import CheckpointManager
from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, tag_for, verify_checkpoint
from mgt_scale.checkpoint.retention import DAMAGED, REASON, plan_retention


def plan(steps, newest, keep_last=2, keep_every=0, damaged=(), complete=None):
    asked = []

    def problems(s):
        asked.append(s)
        return [f"step {s}: sha256 mismatch"] if s in damaged else []
    delete, bad = plan_retention(steps, steps if complete is None else complete, newest, keep_last,
                                 keep_every, problems)
    return delete, sorted(bad), asked


def test_plan_keeps_the_newest_good_ones_and_never_counts_a_damaged_one():
    # the issue: 6 damaged, resumed from 4, saved 5. Before: keep {5, 6}, delete 4
    assert plan([4, 5, 6], newest=5, damaged={6}) == ([], [6], [6, 4])
    # all good: the two highest, as before
    assert plan([2, 4, 6, 8], newest=8) == ([2, 4], [], [6])
    # a damaged one in the middle is skipped over: the next older good one is kept instead
    assert plan([2, 4, 6, 8], newest=8, damaged={6}) == ([2], [6], [6, 4])
    # several damaged, keep_last 3
    assert plan([1, 2, 3, 4, 5], newest=5, keep_last=3, damaged={4, 3}) == ([], [3, 4], [4, 3, 2, 1])
    # the one just written always counts and is not re-verified
    assert plan([2, 4], newest=4, keep_last=1, damaged={4}) == ([2], [], [])
    # keep_every keeps good ones only; damaged ones are never in the delete list (they are moved aside)
    assert plan([2, 4, 6, 8, 10], newest=10, keep_every=4, damaged={8}) == ([2], [8], [8, 6])
    # older ones than the keep_last good ones are deleted without being verified
    assert plan([2, 4, 6, 8], newest=8, keep_last=1) == ([2, 4, 6], [], [])


def test_plan_handles_interrupted_saves():
    # no manifest: counts neither; deleted below the newest, left above it (the next save replaces it)
    assert plan([2, 3, 4, 6], newest=4, complete=[2, 4]) == ([3], [], [2])
    assert plan([2, 4, 6], newest=4, keep_last=1, complete=[2, 4]) == ([2], [], [])


class StandInEngine:
    """Writes one file into the checkpoint, as DeepSpeed writes its shards."""

    def __init__(self):
        self.module = torch.nn.Linear(2, 2)

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "optim_states.pt").write_bytes(bytes(range(256)) * 16)


def manager(run_dir, keep_last=2) -> CheckpointManager:
    cfg = load_config(None, ["data.synthetic=copy", f"checkpoint.keep_last={keep_last}"])
    return CheckpointManager(str(run_dir), cfg, rank=0, world_size=1)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_resume_past_a_damaged_checkpoint_moves_it_aside_and_keeps_the_good_one(tmp_path):
    m = manager(tmp_path)
    for step in (2, 4, 6):
        m.save(StandInEngine(), step, {})
    ck = tmp_path / "checkpoints"
    assert m.steps() == [4, 6]
    flip(ck / tag_for(6) / "optim_states.pt")

    restarted = manager(tmp_path)
    logs = []
    assert restarted.find_resume(log=logs.append) == ck / tag_for(4)
    moved = restarted.set_aside_damaged(log=logs.append)
    assert len(moved) == 1 and moved[0].parent == ck / DAMAGED and moved[0].name.endswith("-" + tag_for(6))
    assert "sha256 mismatch" in (moved[0] / REASON).read_text()
    assert verify_checkpoint(moved[0] / tag_for(6)) != []  # moved untouched: still damaged
    assert (ck / LATEST).read_text().strip() == tag_for(4)  # never a folder that moved away
    restarted.save(StandInEngine(), 5, {})
    assert restarted.steps() == [4, 5]  # before: [5, 6], the good 4 deleted
    assert manager(tmp_path).find_resume() == ck / tag_for(5)


def test_retention_moves_a_damaged_checkpoint_it_meets_instead_of_counting_it(tmp_path):
    # damage during the run (a truncated file): the next save's retention finds it (sizes), moves it
    m = manager(tmp_path)
    for step in (2, 4):
        m.save(StandInEngine(), step, {})
    shard = tmp_path / "checkpoints" / tag_for(4) / "optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    m.save(StandInEngine(), 6, {})
    assert m.steps() == [2, 6]
    aside = list((tmp_path / "checkpoints" / DAMAGED).iterdir())
    assert len(aside) == 1 and (aside[0] / tag_for(4) / MANIFEST).is_file()
    assert "size 100" in (aside[0] / REASON).read_text()
    m.save(StandInEngine(), 8, {})
    assert m.steps() == [6, 8] and len(list((tmp_path / "checkpoints" / DAMAGED).iterdir())) == 1


def test_retention_hashes_an_unknown_checkpoint_before_counting_it(tmp_path):
    # a checkpoint this process neither wrote nor verified gets the full check (same size, flipped byte)
    m = manager(tmp_path)
    for step in (2, 4):
        m.save(StandInEngine(), step, {})
    flip(tmp_path / "checkpoints" / tag_for(4) / "optim_states.pt")
    other = manager(tmp_path)  # e.g. resumed with --resume PATH to step 2's checkpoint
    other.save(StandInEngine(), 6, {})
    assert other.steps() == [2, 6]


# -- end to end: `mgt train`, ZeRO-3 on CPU, one rank ----------------------------------------------
def write_config(tmp_path: Path, max_steps: int) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    cfg = {"run": {"dir": str(run_dir), "name": "retention"},
           "model": {"num_layers": 2, "d_model": 32, "num_heads": 4, "d_ff": 64, "vocab_size": 64,
                     "max_seq_len": 32},
           "data": {"synthetic": "copy", "seq_len": 16, "prefetch": 0},
           "train": {"max_steps": max_steps, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1,
                     "log_interval": 1},
           "parallel": {"precision": "fp32"},
           "checkpoint": {"interval": 2, "keep_last": 2},
           "monitor": {"interval": 0}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    return path, run_dir


def train(config: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))


@pytest.mark.slow
def test_mgt_train_keeps_the_good_checkpoint_after_falling_back_from_a_damaged_one(tmp_path):
    config, run_dir = write_config(tmp_path, max_steps=6)
    r = train(config)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == [tag_for(4), tag_for(6)]
    good = {p.name: p.read_bytes() for p in (ck / tag_for(4)).iterdir() if p.is_file()}
    flip(next((ck / tag_for(6)).glob("*optim_states.pt")))

    # resume with max_steps just past the older checkpoint: falls back to 4, trains 5, saves 5
    r = train(config, "--resume", "auto", "--set", "train.max_steps=5")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"resumed from {ck / tag_for(4)} at step 4" in out
    assert sorted(p.name for p in ck.glob("step_*")) == [tag_for(4), tag_for(5)]  # before: 5 and 6
    assert {p.name: p.read_bytes() for p in (ck / tag_for(4)).iterdir() if p.is_file()} == good
    aside = list((ck / DAMAGED).iterdir())
    assert len(aside) == 1 and aside[0].name.endswith("-" + tag_for(6))
    assert verify_checkpoint(aside[0] / tag_for(6)) and "sha256 mismatch" in (aside[0] / REASON).read_text()
    assert (ck / LATEST).read_text().strip() == tag_for(5)

    # the damaged one is out of sight: --resume auto takes 5, rejects nothing, trains 6 anew
    r = train(config, "--resume", "auto")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"resumed from {ck / tag_for(5)} at step 5" in out and "rejected" not in out
    assert sorted(p.name for p in ck.glob("step_*")) == [tag_for(5), tag_for(6)]
    assert verify_checkpoint(ck / tag_for(6)) == []
    assert list((ck / DAMAGED).iterdir()) == aside
