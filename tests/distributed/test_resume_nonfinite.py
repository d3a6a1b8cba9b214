# Non-finite steps in real runs: NaN losses (MGT_FAULT_NAN_STEPS, tests/fault_hooks) are skipped, counted and
# logged; max_consecutive_nonfinite in a row roll back to the last good checkpoint (2 ranks), or stop
# with exit code 87 under nonfinite_policy=stop (1 rank).
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def write(tmp_path, name, train, parallel=None):
    run_dir = tmp_path / name
    cfg = {"run": {"dir": str(run_dir)},
           "model": {"num_layers": 4, "d_model": 32, "num_heads": 4, "d_ff": 64, "vocab_size": 64, "max_seq_len": 32},
           "data": {"synthetic": "copy", "seq_len": 32, "prefetch": 0},
           "train": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 2, "warmup_steps": 2,
                     "log_interval": 1, "max_consecutive_nonfinite": 3} | train,
           "parallel": {"precision": "fp32"} | (parallel or {}), "checkpoint": {"interval": 2, "keep_last": 3}, "monitor": {"interval": 0}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(cfg))
    return p, run_dir


FAULT_HOOKS = Path(__file__).resolve().parents[1] / "fault_hooks"


def train(config, ranks, nan_steps):
    """`nan_steps`: the steps (0-based, as counted before each) whose loss the fault hook makes NaN."""
    env = dict(os.environ, MGT_FAULT_NAN_STEPS=",".join(map(str, nan_steps)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULT_HOOKS), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(config),
                           "--num-ranks", str(ranks)], capture_output=True, text=True, timeout=600, env=env)


def records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_nan_steps_skipped_then_rollback(tmp_path):
    # steps (1-based) 5, 6, 7 have NaN losses: skipped; the third in a row rolls back to step_00000006
    # (saved during the streak; skipped steps leave the weights as they were at step 4)
    config, run_dir = write(tmp_path, "rb", {"nonfinite_policy": "rollback"})
    r = train(config, 2, [4, 5, 6])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    recs = records(run_dir)
    skipped = [x["step"] for x in recs if x.get("skipped")]
    assert skipped[:3] == [5, 6, 7]
    assert "update skipped (1 consecutive, 1 in total)" in out
    rb = [x for x in recs if x.get("nonfinite_action") == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 7
    assert "rolled back to step_00000006" in out
    final = [x for x in recs if x["step"] == 10 and "loss" in x][-1]
    assert final["loss"] == final["loss"]  # finite at the end
    status = json.loads((run_dir / "status.json").read_text())
    assert status["exit_code"] == 0 and status["step"] == 10


def test_nan_policy_stop_exits_87(tmp_path):
    config, run_dir = write(tmp_path, "stop", {"nonfinite_policy": "stop"})
    r = train(config, 1, [2, 3, 4])
    assert r.returncode == 87, (r.stdout + r.stderr)[-4000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["exit_code"] == 87 and status["step"] == 5 and "nonfinite_policy=stop" in status["reason"]
    assert [x["step"] for x in records(run_dir) if x.get("skipped")] == [3, 4, 5]


def test_pipeline_nan_step_is_skipped(tmp_path):
    # 2 pipeline stages, fp32 ZeRO-0: DeepSpeed's own fp32 path has no overflow check, so without our
    # guarded optimizer step the NaN gradients of step 5 would be written into every weight and every
    # later loss would be NaN. Skipped, the run goes on with finite losses and the skip is counted.
    config, run_dir = write(tmp_path, "pipe", {},
                            {"mode": "pipeline", "pipeline_stages": 2, "zero_stage": 0})
    r = train(config, 2, [4])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    recs = [x for x in records(run_dir) if "loss" in x]
    assert [x["step"] for x in recs if x.get("skipped")] == [5]
    after = [x["loss"] for x in recs if x["step"] > 5]
    assert len(after) == 5 and all(v == v for v in after), after
    assert "update skipped (1 consecutive, 1 in total)" in out
