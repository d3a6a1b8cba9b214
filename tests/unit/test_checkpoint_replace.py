# Saving a step that already has a completed checkpoint (after a rollback to that step, the run saves it
# again with the data position moved on) must never leave the run without it, nor `latest_good` on a
# half-written one: the new save is written to checkpoints/.resave/step_N and swapped in once complete
# and verified; a run that starts after a kill cleans up (or finishes the swap of a complete new save).
# CheckpointManager with a stand-in engine whose save writes one file (or fails half-way, as a kill
# would leave it); one process, no DeepSpeed.
import json
from pathlib import Path

import pytest
import torch

from mgt_scale.config import load_config
from mgt_scale.checkpoint.manager import CheckpointManager
from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, verify_checkpoint


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
    # what the kill left: the completed one in place (the new one was written beside it), and
    # `latest_good` on it: `mgt export` / `mgt eval` before any restart read a complete checkpoint
    assert (ckpt / LATEST).read_text().strip() == "step_00000004"
    assert verify_checkpoint(ckpt / "step_00000004") == []
    assert weights(saved_once) == "first save of step 4"
    assert manager(saved_once).completed_steps() == [4]

    restarted = manager(saved_once)
    assert restarted.recover_interrupted_saves() == []
    assert restarted.find_resume() == ckpt / "step_00000004"
    assert weights(saved_once) == "first save of step 4"
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, "step_00000004"]  # the interrupted new save is gone


def test_latest_good_names_a_complete_checkpoint_while_a_step_is_saved_again(saved_once):
    """The review finding: after a rollback the re-save of a step moved the completed checkpoint aside
    and wrote the new one under the name `latest_good` holds, so every moment of the save (and a kill
    at any of them) left `latest_good` naming a half-written directory."""
    ckpt = saved_once / "checkpoints"
    seen = []

    class Watching(StandInEngine):
        def save(self, save_dir, tag, client_state):
            super().save(save_dir, tag, client_state)
            latest = ckpt / (ckpt / LATEST).read_text().strip()  # what a reader of latest_good gets now
            seen.append((verify_checkpoint(latest), (latest / "weights.txt").read_text()))
    manager(saved_once).save(Watching("second save of step 4"), 4, {"loader": 200})
    assert seen == [([], "first save of step 4")]
    assert weights(saved_once) == "second save of step 4"
    assert verify_checkpoint(ckpt / "step_00000004") == []


@pytest.mark.slow  # > 2 s (runs the rendered script several times / a subprocess)
def test_a_sigkill_during_a_resave_leaves_latest_good_on_a_complete_checkpoint(saved_once):
    import subprocess
    import sys
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from test_checkpoint_replace import StandInEngine, manager
class Dying(StandInEngine):
    def save(self, save_dir, tag, client_state):
        from pathlib import Path
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "weights.txt").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
manager(__import__("pathlib").Path({str(saved_once)!r})).save(Dying("x"), 4, {{"loader": 200}})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    ckpt = saved_once / "checkpoints"
    latest = ckpt / (ckpt / LATEST).read_text().strip()
    assert verify_checkpoint(latest) == []
    assert (latest / "weights.txt").read_text() == "first save of step 4"
    assert manager(saved_once).recover_interrupted_saves() == []
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, "step_00000004"]


def test_a_new_save_that_fails_verification_is_not_put_in_place(saved_once, monkeypatch):
    import mgt_scale.checkpoint.manager as checkpoint
    real = checkpoint.write_manifest

    def write_then_lose_a_byte(tag_dir, meta, hashed=None):
        real(tag_dir, meta, hashed)
        (tag_dir / "weights.txt").write_text("second save of step ")  # truncated after the manifest
    monkeypatch.setattr(checkpoint, "write_manifest", write_then_lose_a_byte)
    with pytest.raises(checkpoint.CheckpointError, match="does not verify"):
        manager(saved_once).save(StandInEngine("second save of step 4"), 4, {"loader": 200})
    ckpt = saved_once / "checkpoints"
    assert (ckpt / LATEST).read_text().strip() == "step_00000004"
    assert weights(saved_once) == "first save of step 4"
    assert verify_checkpoint(ckpt / "step_00000004") == []


def test_a_kill_between_the_swap_renames_puts_the_complete_new_save_in_place(saved_once, monkeypatch):
    import mgt_scale.checkpoint.manager as checkpoint
    real_replace = checkpoint.os.replace

    def replace(src, dst):
        if Path(src).parent.name == ".resave":  # the old one moved aside, the new one not yet in place
            assert (Path(dst).parent / ".step_00000004.replaced" / MANIFEST).is_file()
            raise Killed()
        return real_replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(Killed):
        manager(saved_once).save(StandInEngine("second save of step 4"), 4, {"loader": 200})
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    ckpt = saved_once / "checkpoints"
    assert manager(saved_once).recover_interrupted_saves() == ["step_00000004"]
    assert weights(saved_once) == "second save of step 4"
    assert verify_checkpoint(ckpt / "step_00000004") == []
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, "step_00000004"]


def test_an_old_style_interrupted_replacement_is_still_put_back(saved_once):
    # what a kill during a replacement left before .resave/: the completed one kept aside, an
    # incomplete new one under the step's name
    ckpt = saved_once / "checkpoints"
    (ckpt / "step_00000004").rename(ckpt / ".step_00000004.replaced")
    (ckpt / "step_00000004").mkdir()
    (ckpt / "step_00000004" / "weights.txt").write_text("half")
    restarted = manager(saved_once)
    logged = []
    assert restarted.recover_interrupted_saves(log=logged.append) == ["step_00000004"]
    assert "replacement was interrupted" in logged[0]
    assert restarted.find_resume() == ckpt / "step_00000004"
    assert weights(saved_once) == "first save of step 4"
    assert not (ckpt / ".step_00000004.replaced").exists()


def test_a_completed_replacement_wins_over_the_kept_copy(saved_once, monkeypatch):
    # a kill after the new manifest but before the kept copy is deleted
    import mgt_scale.checkpoint.manager as checkpoint
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
