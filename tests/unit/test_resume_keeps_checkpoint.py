# Resuming must never put checkpoints at risk or follow the wrong history. One rank, `mgt train`
# subprocesses, ZeRO-3 on CPU (the last test: CheckpointManager's folder rules, without training).
# - A finished run started again with `--resume auto` (a re-run of the README demo, a SLURM job requeued
#   after it finished) used to save its final step again: CheckpointManager.save deletes the existing
#   step directory and rewrites it, so a kill in that window left no checkpoint at all (keep_last 1).
# - `--resume PATH` to an older checkpoint of the same run (a deliberate rollback) left the newer ones in
#   place, and the next `--resume auto` (any requeue) went back to the abandoned branch's newest. From
#   another run's checkpoint, this run's own checkpoint of that step was deleted and rewritten.
# - A universal conversion is reused only for the very files it was converted from.
# - A kill while a completed checkpoint was being replaced by a new save of the same step: the next
#   start puts the completed one back and resumes from it (the folder rules: test_checkpoint_replace.py).
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 4
slow = pytest.mark.slow


def write_config(tmp_path: Path, name: str, max_steps: int = STEPS, keep_last: int = 1,
                 seed: int = 0) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    cfg = {"run": {"dir": str(run_dir), "name": name},
           "model": {"num_layers": 2, "d_model": 32, "num_heads": 4, "d_ff": 64, "vocab_size": 64,
                     "max_seq_len": 32},
           "data": {"synthetic": "copy", "seq_len": 16, "prefetch": 0},
           "train": {"max_steps": max_steps, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1,
                     "log_interval": 1, "seed": seed},
           "parallel": {"precision": "fp32"},
           "checkpoint": {"interval": 2, "keep_last": keep_last},
           "monitor": {"interval": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path, run_dir


FAULT_HOOKS = Path(__file__).resolve().parents[1] / "fault_hooks"  # MGT_FAULT_KILL_DURING_SAVE


def train(config: Path, *extra, env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULT_HOOKS), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=600, env=env)


def fingerprint(tag_dir: Path) -> dict:
    """Every file of a checkpoint with its content hash and modification time."""
    return {str(p.relative_to(tag_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(tag_dir.rglob("*")) if p.is_file()}


@slow
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


@slow
def test_a_start_after_an_interrupted_replacement_resumes_from_the_completed_checkpoint(tmp_path):
    config, run_dir = write_config(tmp_path, "replaced", keep_last=2)
    assert train(config).returncode == 0
    ck = run_dir / "checkpoints"
    final = ck / f"step_{STEPS:08d}"
    before = fingerprint(final)
    # what CheckpointManager.save leaves when killed while replacing it: the completed one kept aside,
    # the new one with part of its files and no manifest
    kept = ck / f".{final.name}.replaced"
    os.replace(final, kept)
    shard = next(p for p in sorted(kept.rglob("*.pt")))
    partial = final / shard.relative_to(kept)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    r = train(config, "--resume", "auto", "--set", f"train.max_steps={STEPS + 2}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"checkpoint {final.name}: its replacement was interrupted; put the completed one back" in out
    assert f"resumed from {final} at step {STEPS}" in out
    assert not kept.exists()
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [STEPS + 1, STEPS + 2]
    assert fingerprint(final) == before  # the completed checkpoint is back, untouched
    assert sorted(p.name for p in ck.glob("step_*")) == [final.name, f"step_{STEPS + 2:08d}"]


@slow
def test_resuming_from_another_runs_checkpoint_still_saves_into_this_run(tmp_path):
    """The skip holds only for a checkpoint of this run's own directory: a run started from a
    checkpoint elsewhere must end with its final state in its own checkpoints. Its own checkpoint of
    that step (other weights) is set aside first, not deleted and rewritten."""
    config_a, run_a = write_config(tmp_path, "a", seed=1)
    config_b, run_b = write_config(tmp_path, "b", seed=2)
    assert train(config_a).returncode == 0 and train(config_b).returncode == 0
    source = run_a / "checkpoints" / f"step_{STEPS:08d}"
    own = run_b / "checkpoints" / f"step_{STEPS:08d}"
    before = fingerprint(own)
    r = train(config_b, "--resume", str(source))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"resumed from {source} at step {STEPS}" in out and "checkpoint saved" in out
    aside = list((run_b / "checkpoints" / "abandoned").iterdir())
    assert len(aside) == 1 and fingerprint(aside[0] / own.name) == before
    assert f"moved {own.name} to {aside[0]}" in out
    assert (own / "mgt_manifest.json").is_file() and fingerprint(own) != before
    assert (run_b / "checkpoints" / "latest_good").read_text().strip() == own.name


@slow
def test_resuming_an_older_checkpoint_sets_the_abandoned_branch_aside(tmp_path):
    config, run_dir = write_config(tmp_path, "branch", max_steps=6, keep_last=3)
    assert train(config).returncode == 0
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    old = {tag: fingerprint(ck / tag) for tag in ("step_00000004", "step_00000006")}

    # roll back to step 2 on purpose; the new branch saves step 4 and dies at step 5
    r = train(config, "--resume", str(ck / "step_00000002"), env={"MGT_FAULT_SIGKILL_AT_STEP": "5"})
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "fault injection: SIGKILL at step 5" in out, out[-3000:]
    aside = [p for p in (ck / "abandoned").iterdir()]
    assert len(aside) == 1 and aside[0].name.endswith("-from-step_00000002"), aside
    assert f"moved step_00000004, step_00000006 to {aside[0]}" in out
    assert {tag: fingerprint(aside[0] / tag) for tag in old} == old  # moved untouched
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (ck / "step_00000004" / "mgt_manifest.json").is_file()  # the new branch's own
    assert (ck / "latest_good").read_text().strip() == "step_00000004"

    # the requeue: before, this resumed the abandoned step 6 and "finished" without training
    r = train(config, "--resume", "auto")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"resumed from {ck / 'step_00000004'} at step 4" in out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(steps) == list(range(1, 7)), steps  # each step once: 5 and 6 trained on the new branch
    assert {tag: fingerprint(aside[0] / tag) for tag in old} == old


@slow
def test_universal_conversion_is_redone_when_the_step_holds_other_files(tmp_path):
    from mgt_scale.checkpoint.manifest import MANIFEST, sha256_file, universal_dir
    from mgt_scale.checkpoint.universal import make_universal
    config_a, run_a = write_config(tmp_path, "a", seed=1)
    config_b, run_b = write_config(tmp_path, "b", seed=2)
    assert train(config_a).returncode == 0 and train(config_b).returncode == 0
    tag_a = run_a / "checkpoints" / f"step_{STEPS:08d}"
    tag_b = run_b / "checkpoints" / f"step_{STEPS:08d}"
    messages = []
    out = make_universal(tag_a, log=messages.append)
    assert any(m.startswith("converting:") for m in messages)
    uni = json.loads((out / MANIFEST).read_text())
    assert uni["source_manifest_sha256"] == sha256_file(tag_a / MANIFEST)
    messages.clear()
    assert make_universal(tag_a, log=messages.append) == out and messages == []  # same files: reused

    # the step directory now holds other contents (another seed's weights) under the same name
    shutil.rmtree(tag_a)
    shutil.copytree(tag_b, tag_a)
    messages.clear()
    assert make_universal(tag_a, log=messages.append) == universal_dir(tag_a)
    assert any("converted from other contents" in m for m in messages), messages
    assert any(m.startswith("converting:") for m in messages), messages
    assert json.loads((out / MANIFEST).read_text())["source_manifest_sha256"] == sha256_file(tag_b / MANIFEST)


def test_set_aside_moves_only_completed_checkpoints_and_keeps_latest_good_on_one_that_exists(tmp_path):
    """No training: checkpoint folders with or without a manifest, as CheckpointManager sees them."""
    from mgt_scale.config import load_config
    from mgt_scale.checkpoint.manager import CheckpointManager
    from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, tag_for
    manager = CheckpointManager(str(tmp_path / "run"), load_config(None, ["data.synthetic=copy"]), 0, 1)
    for step, complete in ((2, True), (4, True), (6, False), (8, True)):
        (manager.dir / tag_for(step)).mkdir(parents=True)
        (manager.dir / tag_for(step) / "shard.pt").write_text(str(step))
        if complete:
            (manager.dir / tag_for(step) / MANIFEST).write_text("{}")
    (manager.dir / LATEST).write_text(tag_for(8) + "\n")

    # another run's step 4: this run's own 4 holds other weights, 8 is later; 6 never completed
    moved = manager.set_aside_newer(4, tmp_path / "other" / "checkpoints" / tag_for(4), log=lambda m: None)
    assert sorted(p.name for p in moved.iterdir()) == [tag_for(4), tag_for(8)]
    assert (moved / tag_for(8) / "shard.pt").read_text() == "8"
    assert manager.steps() == [2, 6]
    assert (manager.dir / LATEST).read_text().strip() == tag_for(2)  # never a folder that moved away

    # this run's own step 2: nothing later is complete, so nothing moves
    assert manager.set_aside_newer(2, manager.dir / tag_for(2), log=lambda m: None) is None
    # another run's step 2 when 2 is the only complete one left: no pointer rather than a dangling one
    second = manager.set_aside_newer(2, tmp_path / "other" / tag_for(2), log=lambda m: None)
    assert second != moved and [p.name for p in second.iterdir()] == [tag_for(2)]
    assert manager.steps() == [6] and not (manager.dir / LATEST).exists()
