# Resuming must never put the checkpoint it resumed from at risk. A finished run started again with
# `--resume auto` (a re-run of the README demo, a SLURM job requeued after it finished) used to save its
# final step again: CheckpointManager.save deletes the existing step directory and rewrites it, so a
# kill in that window left no usable checkpoint at all when keep_last is 1. One rank, `mgt train`
# subprocesses, ZeRO-3 on CPU.
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
STEPS = 4


def write_config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    cfg = {"run": {"dir": str(run_dir), "name": name},
           "model": {"num_layers": 2, "d_model": 32, "num_heads": 4, "d_ff": 64, "vocab_size": 64,
                     "max_seq_len": 32},
           "data": {"synthetic": "copy", "seq_len": 16, "prefetch": 0},
           "train": {"max_steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1,
                     "log_interval": 1},
           "parallel": {"precision": "fp32"},
           "checkpoint": {"interval": 2, "keep_last": 1},
           "monitor": {"interval": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path, run_dir


def train(config: Path, *extra, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, **(env or {})))


def fingerprint(tag_dir: Path) -> dict:
    """Every file of a checkpoint with its content hash and modification time."""
    return {str(p.relative_to(tag_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(tag_dir.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_leaves_its_checkpoint_untouched_even_if_killed(tmp_path):
    config, run_dir = write_config(tmp_path, "done")
    first = train(config)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ck = run_dir / "checkpoints"
    final = ck / f"step_{STEPS:08d}"
    assert sorted(p.name for p in ck.glob("step_*")) == [final.name]  # keep_last 1: the only one
    before = fingerprint(final)

    # Started again, as a requeued job is. The kill arms on a save of the final step: before the fix
    # that save happened and the kill left the only checkpoint without its manifest.
    again = train(config, "--resume", "auto", env={"MGT_FAULT_KILL_DURING_SAVE": str(STEPS)})
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert f"resumed from {final} at step {STEPS}" in out
    assert "checkpoint saved" not in out and "killing rank 0" not in out
    assert fingerprint(final) == before
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == STEPS

    third = train(config, "--resume", "auto")
    assert third.returncode == 0 and f"resumed from {final} at step {STEPS}" in third.stdout, third.stdout[-3000:]


def test_resuming_from_another_runs_checkpoint_still_saves_into_this_run(tmp_path):
    """The skip holds only for a checkpoint of this run's own directory: a run started from a
    checkpoint elsewhere must end with its final state in its own checkpoints."""
    config_a, run_a = write_config(tmp_path, "a")
    assert train(config_a).returncode == 0
    source = run_a / "checkpoints" / f"step_{STEPS:08d}"
    config_b, run_b = write_config(tmp_path, "b")
    r = train(config_b, "--resume", str(source))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"resumed from {source} at step {STEPS}" in out and "checkpoint saved" in out
    own = run_b / "checkpoints" / f"step_{STEPS:08d}"
    assert (own / "mgt_manifest.json").is_file()
    assert (run_b / "checkpoints" / "latest_good").read_text().strip() == own.name
