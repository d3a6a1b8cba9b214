# Asynchronous saves (checkpoint.async_save): the step loop waits only for a copy of the state; the
# files are written in the background; the manifest and `latest_good` move only once the write is
# complete. A SIGKILL at any point of an asynchronous save loses nothing: `latest_good` still names a
# complete checkpoint that verifies, and `--resume auto` (find_resume) finds a good one. One rank, a
# stand-in engine writing through a DeepSpeed-like `engine.checkpoint_engine.save`, in a subprocess
# that the fault injection kills.
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    from mgt_scale.config import load_config
    from mgt_scale.checkpoint.manager import CheckpointManager

    class SlowWriter:  # DeepSpeed's TorchCheckpointEngine, on a slow disk
        def save(self, state_dict, path):
            time.sleep(0.5)
            torch.save(state_dict, path)

    class Engine:
        def __init__(self):
            self.module = torch.nn.Linear(2, 2)
            self.engine = type("DS", (), {})()
            self.engine.checkpoint_engine = SlowWriter()
            self.w = torch.zeros(1 << 16)

        def save(self, save_dir, tag, client_state):
            d = Path(save_dir) / tag
            d.mkdir(parents=True, exist_ok=True)
            self.engine.checkpoint_engine.save({"w": self.w}, str(d / "zero_pp_rank_0_optim_states.pt"))

    run_dir, faults = sys.argv[1], json.loads(sys.argv[2])
    cfg = load_config(None, ["data.synthetic=copy", "checkpoint.async_save=true", "checkpoint.keep_last=2"])
    m = CheckpointManager(run_dir, cfg, 0, 1)
    e = Engine()
    timing = {}
    for step in (2, 4):
        e.w.fill_(step)
        if step == 4:
            os.environ.update(faults)
        t = time.perf_counter()
        m.save(e, step, {})
        timing[f"blocked_{step}"] = time.perf_counter() - t
        e.w.fill_(-1)  # training goes on and changes the weights while the file is written
        t = time.perf_counter()
        m.wait()
        timing[f"wait_{step}"] = time.perf_counter() - t
    Path(run_dir, "timing.json").write_text(json.dumps(timing))
""")


FAULT_HOOKS = Path(__file__).resolve().parents[1] / "fault_hooks"  # MGT_FAULT_KILL_* (ASYNC_KILL: ckpt_writer)


def run(tmp_path: Path, faults: dict) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MGT_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULT_HOOKS), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir), json.dumps(faults)], capture_output=True,
                          text=True, timeout=300, env=env)


def shard_value(tag_dir: Path) -> float:
    import torch
    return float(torch.load(tag_dir / "zero_pp_rank_0_optim_states.pt", weights_only=True)["w"][0])


@pytest.mark.slow
def test_an_async_save_returns_before_the_write_and_saves_the_state_of_its_step(tmp_path):
    from mgt_scale.checkpoint.manifest import LATEST, verify_checkpoint
    r = run(tmp_path, {})
    assert r.returncode == 0, r.stderr
    ck = tmp_path / "run" / "checkpoints"
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert timing["blocked_4"] < 0.4 <= timing["wait_4"]  # the 0.5 s write happened off the step loop
    assert (ck / LATEST).read_text().strip() == "step_00000004" and verify_checkpoint(ck / "step_00000004") == []
    assert shard_value(ck / "step_00000004") == 4.0  # not the -1 written into the weights after save()


@pytest.mark.parametrize("faults,complete", [
    ({"MGT_FAULT_ASYNC_KILL": "before_write"}, False),  # nothing of step 4 written yet
    ({"MGT_FAULT_ASYNC_KILL": "after_write"}, False),  # the shard written, not yet hashed, no manifest
    ({"MGT_FAULT_KILL_DURING_SAVE": "4"}, False),  # every file written and hashed, no manifest
    ({"MGT_FAULT_KILL_AFTER_MANIFEST": "4"}, True),  # manifest written, `latest_good` not yet moved
])
@pytest.mark.slow
def test_a_kill_during_an_async_save_loses_nothing(tmp_path, faults, complete):
    from mgt_scale.config import load_config
    from mgt_scale.checkpoint.manager import CheckpointManager
    from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, verify_checkpoint
    r = run(tmp_path, faults)
    assert r.returncode in (-signal.SIGKILL, 137), (r.returncode, r.stdout, r.stderr)
    ck = tmp_path / "run" / "checkpoints"
    latest = ck / (ck / LATEST).read_text().strip()
    assert latest.name == "step_00000002"
    assert verify_checkpoint(latest) == [] and shard_value(latest) == 2.0
    assert (ck / "step_00000004" / MANIFEST).is_file() == complete
    cfg = load_config(None, ["data.synthetic=copy", "checkpoint.async_save=true"])
    found = CheckpointManager(str(tmp_path / "run"), cfg, 0, 1).find_resume(log=lambda *a: None)
    assert found.name == ("step_00000004" if complete else "step_00000002")
    assert verify_checkpoint(found) == []


@pytest.mark.slow
def test_mgt_train_with_async_saves_writes_complete_checkpoints_hashed_by_their_writer(tmp_path):
    """ZeRO-3 through DeepSpeed's own save_checkpoint, one rank: every checkpoint complete and verified,
    each DeepSpeed file recorded as hashed by the rank that wrote it; a resume continues from the last."""
    from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, verify_checkpoint
    run_dir = tmp_path / "run"
    cfg = {"run": {"dir": str(run_dir), "name": "async"},
           "model": {"num_layers": 2, "d_model": 32, "num_heads": 4, "d_ff": 64, "vocab_size": 64, "max_seq_len": 32},
           "data": {"synthetic": "copy", "seq_len": 16, "prefetch": 0},
           "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_interval": 1},
           "parallel": {"precision": "fp32"}, "checkpoint": {"interval": 2, "keep_last": 2, "async_save": True},
           "monitor": {"interval": 0}}
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MGT_FAULT")
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    train = [sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(config)]
    r = subprocess.run(train, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = run_dir / "checkpoints"
    assert (ck / LATEST).read_text().strip() == "step_00000004"
    for tag in ("step_00000002", "step_00000004"):
        assert verify_checkpoint(ck / tag) == []
        files = json.loads((ck / tag / MANIFEST).read_text())["files"]
        ds_files = [f for f in files if f.endswith("_states.pt")]
        assert ds_files and all(files[f].get("rank") == 0 for f in ds_files), files
    cfg["train"]["max_steps"] = 6
    config.write_text(json.dumps(cfg))
    r = subprocess.run(train + ["--resume", "auto"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "at step 4" in r.stdout and (ck / LATEST).read_text().strip() == "step_00000006"
