# Collapse alarms in a real (1-rank, tiny) training run: a threshold set to trip triggers each policy.
# warn: the run goes on and finishes; checkpoint_and_stop: checkpoint + exit 86 (no requeue);
# rollback: weights restored from the last good checkpoint, repeated alarms escalate to a stop.
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mgt_scale import exit_codes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def train(tmp_path, policy, *extra):
    run_dir = tmp_path / policy
    cmd = [sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(REPO / "configs/tiny_synthetic.yaml"),
           "--set", f"run.dir={run_dir}", "--set", "train.max_steps=8", "--set", "monitor.interval=2",
           "--set", "monitor.probe_seq_len=32", "--set", "monitor.alarm_eff_rank_norm_below=0.99",
           "--set", f"monitor.alarm_policy={policy}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert (run_dir / "geometry.jsonl").exists(), f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    geo = [json.loads(l) for l in (run_dir / "geometry.jsonl").read_text().splitlines()]
    return r, run_dir, geo


def test_warn_continues(tmp_path):
    r, run_dir, geo = train(tmp_path, "warn")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("COLLAPSE ALARM") == 4 and [g["step"] for g in geo] == [2, 4, 6, 8]
    assert "eff_rank_norm=" in r.stdout and "< 0.99" in r.stdout


def test_checkpoint_and_stop(tmp_path):
    r, run_dir, geo = train(tmp_path, "checkpoint_and_stop")
    assert r.returncode == exit_codes.COLLAPSE, r.stderr[-2000:]
    assert (run_dir / "checkpoints" / "latest_good").read_text().strip() == "step_00000002"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["exit_code"] == exit_codes.COLLAPSE
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["alarm"] == "checkpoint_and_stop"


def test_rollback_then_escalates(tmp_path):
    r, run_dir, geo = train(tmp_path, "rollback", "--set", "checkpoint.interval=1",
                            "--set", "monitor.alarm_max_rollbacks=2")
    assert "rolled back to step_00000001" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert r.stdout.count("rolled back to") == 2
    assert r.returncode == exit_codes.COLLAPSE  # the third alarm escalates to checkpoint_and_stop
