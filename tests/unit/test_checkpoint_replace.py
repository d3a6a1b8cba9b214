# Saving a step that already has a completed checkpoint (after a rollback to that step, the run saves it
# again with the data position moved on) must never leave the run without it: the completed one is
# kept aside until the new one is complete, and a run that starts after a kill in between puts it back.
# CheckpointManager with a stand-in engine whose save writes one file (or fails half-way, as a kill
# would leave it); one process, no DeepSpeed.
import json

import pytest
import torch

from mgt_scale.config import load_config
from mgt_scale.train.checkpoint import CheckpointManager
from mgt_scale.train.ckpt_format import LATEST, MANIFEST, verify_checkpoint


class Killed(Exception):
    pass


class StandInEngine:
    """Writes `weights.txt` = `content` into the checkpoint, as DeepSpeed writes its shards; with
    `die=True` it writes half of it and raises, leaving what a kill during the write leaves."""

    def __init__(self, content: str, die: bool = False):
        self.content, self.die = content, die
        self.module = torch.nn.Linear(2, 2)

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        from pathlib import Path
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        if self.die:
            (d / "weights.txt").write_text(self.content[: len(self.content) // 2])
            raise Killed()
        (d / "weights.txt").write_text(self.content)
        (d / "client_state.json").write_text(json.dumps({"loader": client_state.get("loader")}))


def manager(run_dir, keep_last=1) -> CheckpointManager:
    cfg = load_config(None, ["data.synthetic=copy", f"checkpoint.keep_last={keep_last}"])
    return CheckpointManager(str(run_dir), cfg, rank=0, world_size=1)


def weights(run_dir, step=4) -> str:
    return (run_dir / "checkpoints" / f"step_{step:08d}" / "weights.txt").read_text()


@pytest.fixture
def saved_once(tmp_path):
    m = manager(tmp_path)
    m.save(StandInEngine("first save of step 4"), 4, {"loader": 100})
    return tmp_path


def test_a_kill_while_replacing_a_checkpoint_leaves_the_completed_one_to_resume(saved_once):
    with pytest.raises(Killed):
        manager(saved_once).save(StandInEngine("second save of step 4", die=True), 4, {"loader": 200})
    ckpt = saved_once / "checkpoints"
    # what the kill left: the new one incomplete, the completed one kept aside where nothing lists it
    assert not (ckpt / "step_00000004" / MANIFEST).exists()
    assert (ckpt / ".step_00000004.replaced" / MANIFEST).is_file()
    assert manager(saved_once).completed_steps() == []

    restarted = manager(saved_once)
    logged = []
    assert restarted.recover_interrupted_saves(log=logged.append) == ["step_00000004"]
    assert "replacement was interrupted" in logged[0]
    assert restarted.find_resume() == ckpt / "step_00000004"
    assert verify_checkpoint(ckpt / "step_00000004") == []
    assert weights(saved_once) == "first save of step 4"
    assert (ckpt / LATEST).read_text().strip() == "step_00000004"
    assert not (ckpt / ".step_00000004.replaced").exists()


def test_a_completed_replacement_wins_over_the_kept_copy(saved_once, monkeypatch):
    # a kill after the new manifest but before the kept copy is deleted
    import mgt_scale.train.checkpoint as checkpoint
    real_rmtree = checkpoint.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if str(path).endswith(".replaced") and (path / MANIFEST).exists():
            raise Killed()
        return real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        manager(saved_once).save(StandInEngine("second save of step 4"), 4, {"loader": 200})
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    ckpt = saved_once / "checkpoints"
    assert (ckpt / ".step_00000004.replaced").is_dir()
    assert manager(saved_once).recover_interrupted_saves() == []
    assert not (ckpt / ".step_00000004.replaced").exists()
    assert weights(saved_once) == "second save of step 4"
    assert verify_checkpoint(ckpt / "step_00000004") == []


def test_an_uninterrupted_replacement_leaves_only_the_new_checkpoint(saved_once):
    m = manager(saved_once)
    m.save(StandInEngine("second save of step 4"), 4, {"loader": 200})
    ckpt = saved_once / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, "step_00000004"]
    assert weights(saved_once) == "second save of step 4"
    assert json.loads((ckpt / "step_00000004" / "client_state.json").read_text()) == {"loader": 200}
    assert m.find_resume() == ckpt / "step_00000004"


def test_an_incomplete_leftover_of_the_same_step_is_simply_replaced(tmp_path):
    m = manager(tmp_path)
    with pytest.raises(Killed):
        m.save(StandInEngine("interrupted first save", die=True), 4, {})
    m.save(StandInEngine("first save of step 4"), 4, {})
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, "step_00000004"]
    assert weights(tmp_path) == "first save of step 4"
