# The validation loss reaches the run's metric sinks, not only status.json: `mgt train` subprocesses (one
# rank, ZeRO-3 on CPU, synthetic data). The final evaluation used to run in entry.run after the loop,
# when MetricsCallback.on_end had already closed metrics.jsonl, W&B and TensorBoard, so `mgt report` said
# "valid loss: none logged". Also: valid losses at train.eval_interval, and a finished run started
# again, which evaluates without running a step.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 4


def write_config(tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    cfg = {"run": {"dir": str(run_dir), "name": "valid"},
           "model": {"num_layers": 2, "d_model": 32, "num_heads": 4, "d_ff": 64, "vocab_size": 64,
                     "max_seq_len": 32},
           "data": {"synthetic": "copy", "seq_len": 16, "prefetch": 0, "valid_fraction_batches": 2},
           "train": {"max_steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1,
                     "log_interval": 100, "eval_interval": 3},
           "parallel": {"precision": "fp32"},
           "checkpoint": {"interval": 0},
           "monitor": {"interval": 0},
           "log": {"tensorboard": True}}
    path = tmp_path / "valid.yaml"
    path.write_text(json.dumps(cfg))
    return path, run_dir


def mgt(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, WANDB_MODE="disabled"))


def valid_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "valid_loss" in r]


@pytest.mark.slow
def test_valid_loss_in_metrics_report_and_tensorboard(tmp_path):
    config, run_dir = write_config(tmp_path)
    r = mgt("train", "--config", config)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and isinstance(status["valid_loss"], float)
    valid = valid_records(run_dir)
    assert [v["step"] for v in valid] == [3, STEPS]  # eval_interval 3, and the final evaluation
    assert valid[-1]["valid_loss"] == status["valid_loss"]
    assert all(isinstance(v["valid_loss"], float) and "loss" in v for v in valid)  # in the step's record
    # the console line shows it too, with progress
    assert f"step {STEPS}/{STEPS} (100%)" in r.stdout and f"valid {status['valid_loss']:.4f}" in r.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("valid_loss")]
    assert [s for s, _ in tb] == [3, STEPS] and tb[-1][1] == pytest.approx(status["valid_loss"], rel=1e-6)

    rep = mgt("report", run_dir)
    assert rep.returncode == 0, rep.stderr
    md = (run_dir / "report" / "report.md").read_text()
    assert "none logged" not in md and f"(step {STEPS})" in md

    # a finished run started again runs no step: it evaluates anew, and logs it as well
    again = mgt("train", "--config", config, "--resume", "auto")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    status2 = json.loads((run_dir / "status.json").read_text())
    valid2 = valid_records(run_dir)
    assert [v["step"] for v in valid2] == [3, STEPS, STEPS]
    assert valid2[-1]["valid_loss"] == status2["valid_loss"] == pytest.approx(status["valid_loss"], rel=1e-6)
