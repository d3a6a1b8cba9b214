# Operator mistakes at launch: a one-line error naming the problem, a non-zero exit code, and no run
# directory passed off as a finished run.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def mgt(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


@pytest.mark.slow
def test_missing_config_file(tmp_path):
    r = mgt("train", "--config", "nope.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bad_override_names_key(tmp_path):
    r = mgt("train", "--config", str(REPO / "configs/tiny_synthetic.yaml"), "--set", "train.lrr=1", cwd=tmp_path)
    assert r.returncode == 2 and "train.lrr" in r.stderr


@pytest.mark.slow
def test_missing_data_dir_leaves_failed_status(tmp_path):
    run_dir = tmp_path / "run"
    r = mgt("train", "--config", str(REPO / "configs/demo.yaml"), "--set", f"run.dir={run_dir}",
            "--set", f"data.path={tmp_path}/no_such_data", cwd=tmp_path)
    assert r.returncode == 2 and "no_such_data" in r.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_bad_topology_message(tmp_path):
    r = mgt("train", "--config", str(REPO / "configs/tiny_synthetic.yaml"), "--set", "train.global_batch_size=12",
            "--set", "train.micro_batch_size=4", "--num-ranks", "2", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "train.global_batch_size=12" in r.stderr and "multiple of 8" in r.stderr


@pytest.mark.slow
def test_num_ranks_under_a_launcher_that_disagrees(tmp_path):
    # A stray torchrun environment (or --num-ranks inside an srun step) must not silently train 1 rank.
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    r = mgt("train", "--config", str(REPO / "configs/tiny_synthetic.yaml"), "--num-ranks", "2", "--dry-run",
            cwd=tmp_path, env=env)
    assert r.returncode == 2 and "--num-ranks 2" in r.stderr and "world of 1" in r.stderr, r.stderr


@pytest.mark.slow
def test_dry_run_prints_config_and_deepspeed_json(tmp_path):
    r = mgt("train", "--config", str(REPO / "configs/tiny_synthetic.yaml"), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "# resolved config" in r.stdout and '"zero_optimization"' in r.stdout and '"stage": 3' in r.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_existing_checkpoints_need_resume(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000001").mkdir(parents=True)
    r = mgt("train", "--config", str(REPO / "configs/tiny_synthetic.yaml"), "--set", f"run.dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 2 and "--resume auto" in r.stderr


# `mgt train --num-ranks N` places its ranks through the deepspeed launcher, which with `--num_gpus N`
# takes GPUs 0..N-1 and drops CUDA_VISIBLE_DEVICES whether or not they exist (no GPU here: the GPU
# count and the variable are handed in).
@pytest.mark.parametrize("ranks,visible,count,expected", [
    (2, None, 0, ["--num_gpus", "2"]),                       # CPU ranks
    (2, "", 0, ["--num_gpus", "2"]),
    (2, None, 8, ["--num_gpus", "2"]),                       # GPUs 0 and 1
    (2, "4,6,7", 3, ["--include", "localhost:4,6"]),         # the first 2 of the GPUs this job was given
    (1, " 3 ", 1, ["--include", "localhost:3"]),
])
def test_local_ranks_go_on_the_gpus_there_are(ranks, visible, count, expected):
    from mgt_scale.train.entry import local_rank_placement
    assert local_rank_placement(ranks, visible, count) == expected


@pytest.mark.parametrize("ranks,visible,count,words", [
    (2, None, 1, ["--num-ranks 2", "only 1 GPU", "1 GPU(s) on this machine"]),
    (3, "0,1", 2, ["--num-ranks 3", "only 2 GPU", "CUDA_VISIBLE_DEVICES=0,1"]),
    (1, "GPU-8a1f", 1, ["CUDA_VISIBLE_DEVICES=GPU-8a1f", "indices, not UUIDs"]),
])
def test_more_ranks_than_gpus_is_refused(ranks, visible, count, words):
    from mgt_scale.train.entry import local_rank_placement
    with pytest.raises(ValueError) as e:
        local_rank_placement(ranks, visible, count)
    assert all(w in str(e.value) for w in words), str(e.value)
