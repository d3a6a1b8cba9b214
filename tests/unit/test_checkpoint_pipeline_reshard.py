# A pipeline x ZeRO-1 checkpoint saved with data-parallel size 2 (2 stages x 2 = 4 ranks) resumes with
# data-parallel size 1 (the same 2 stages, 2 ranks) through DeepSpeed's universal checkpoint, with the
# same global batch (twice the gradient accumulation): the losses of the steps after the resume are
# those of the uninterrupted 4-rank run. Before, the load refused anything but zero3 -> zero3.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def config(tmp_path: Path, name: str) -> Path:
    cfg = {"run": {"dir": str(tmp_path / name), "name": name},
           "model": {"num_layers": 4, "d_model": 32, "num_heads": 2, "d_ff": 64, "vocab_size": 64, "max_seq_len": 32},
           "data": {"synthetic": "copy", "seq_len": 16, "prefetch": 0},
           "train": {"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "warmup_steps": 1,
                     "log_interval": 1, "lr": 3.0e-3},
           "parallel": {"mode": "pipeline", "pipeline_stages": 2, "zero_stage": 1, "precision": "fp32"},
           "checkpoint": {"interval": 2, "keep_last": 3},
           "monitor": {"interval": 0}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def train(path: Path, ranks: int, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("MGT_FAULT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    r = subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(path), "--num-ranks",
                        str(ranks), *extra], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_pipeline_zero1_saved_with_dp2_resumes_with_dp1_and_the_same_global_batch(tmp_path):
    train(config(tmp_path, "dp2"), 4)
    saved = tmp_path / "dp2" / "checkpoints" / "step_00000002"
    assert json.loads((saved / "mgt_manifest.json").read_text())["world_size"] == 4
    r = train(config(tmp_path, "dp1"), 2, "--resume", str(saved))
    assert "resharding through a universal checkpoint" in r.stdout
    assert (tmp_path / "dp2" / "checkpoints" / "universal" / "step_00000002" / "mgt_manifest.json").is_file()
    before, after = losses(tmp_path / "dp2"), losses(tmp_path / "dp1")
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert abs(after[step] - before[step]) <= 1e-4 * abs(before[step]), (step, before, after)
