# The loop's progress line and final evaluation, without DeepSpeed: a stub engine and loader drive
# the real Trainer and MetricsCallback.
# - Progress: `step 40/200 (20%) | ... | elapsed 1m05s | eta 3m12s`, the ETA from the mean wall time per
#   step since the end of the (re)start's first step; metrics.jsonl records gain `eta` (keys only added).
# - The final validation loss is evaluated inside the loop (the last step's record) or, for a finished
#   run started again, before the callbacks' on_end: the metrics sinks are still open to log it.
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mgt_scale.config import TrainConfig
from mgt_scale.train import callbacks as C
from mgt_scale.train.trainer import Callback, Trainer


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (44.6, "45s"), (59.4, "59s"), (60, "1m00s"), (192, "3m12s"),
                                          (3599, "59m59s"), (3600, "1h00m"), (7500, "2h05m"),
                                          (3 * 86400 + 4 * 3600 + 59, "3d04h"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert C.format_duration(seconds) == text


def test_eta_and_progress_text():
    assert C.eta_seconds(40, 200, None) is None
    assert C.eta_seconds(40, 200, 1.2) == pytest.approx(192.0)
    assert C.eta_seconds(210, 200, 1.0) == 0  # max_steps lowered on a resume
    head, tail = C.progress_text(40, 200, 65.0, 192.0)
    assert head == "step  40/200 (20%)" and tail == "elapsed 1m05s | eta 3m12s"
    assert C.progress_text(200, 200, 5.0, None) == ("step 200/200 (100%)", "elapsed 5s | eta --")


class _Logger:
    def __init__(self):
        self.records, self.closed = [], False

    def log(self, record, step):
        assert not self.closed, "logged after close"
        self.records.append(dict(record, step=step))

    def close(self):
        self.closed = True


class _Engine:
    def __init__(self, valid_loss: float = 2.5):
        self.valid_loss, self.evals = valid_loss, 0

    def set_lr(self, lr):
        pass

    def train_step(self, batches):
        return SimpleNamespace(loss=3.0, grad_norm=1.0, skipped=False)

    def eval_loss(self, batches):
        self.evals += 1
        return self.valid_loss


class _Loader:
    consumed_samples = 0

    def next_step(self):
        return []


def _trainer(tmp_path, max_steps=5, eval_interval=0, valid=True, callbacks=()):
    train = TrainConfig(max_steps=max_steps, eval_interval=eval_interval, warmup_steps=1)
    plan = SimpleNamespace(tokens_per_step=64)
    return Trainer(train, plan, _Engine(), _Loader(), str(tmp_path), 0, callbacks=list(callbacks),
                   valid_batches=[object(), object()] if valid else [])


def test_eta_excludes_the_first_step(tmp_path, monkeypatch, capsys):
    """First step ends at t=100 (after 90 s of start-up); then 2 s per step: at step 3 of 10 the mean is
    2 s (not 31 s), so 7 steps are left: eta 14s."""
    now = [10.0]
    monkeypatch.setattr(C.time, "time", lambda: now[0])
    logger = _Logger()
    cb = C.MetricsCallback(logger, log_interval=1)
    trainer = _trainer(tmp_path, max_steps=10)
    trainer.start_time = 10.0
    for step, t in ((1, 100.0), (2, 102.0), (3, 104.0)):
        now[0] = t
        cb.on_step_end(trainer, {"step": step, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 64.0, "grad_norm": 1.0})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("step  1/10 (10%) | loss 3.0000") and lines[0].endswith("elapsed 1m30s | eta --")
    assert lines[2].startswith("step  3/10 (30%)") and lines[2].endswith("elapsed 1m34s | eta 14s")
    assert "eta" not in logger.records[0] and logger.records[2]["eta"] == pytest.approx(14.0)
    assert logger.records[2]["elapsed"] == pytest.approx(94.0)  # the existing keys stay
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(logger.records[2])


def test_final_valid_loss_is_logged_before_the_loggers_close(tmp_path, capsys):
    logger = _Logger()
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[C.MetricsCallback(logger, log_interval=100)])
    assert trainer.run() == (0, "finished")
    assert logger.closed and trainer.final_valid_loss == pytest.approx(2.5)
    last = logger.records[-1]
    assert last["step"] == 5 and last["valid_loss"] == pytest.approx(2.5) and last["loss"] == 3.0
    assert [r["step"] for r in logger.records if "valid_loss" in r] == [5]
    assert trainer.engine.evals == 2  # one pass over the two validation batches, not a second one
    assert "valid 2.5000" in capsys.readouterr().out


def test_eval_interval_and_final_evaluation_share_the_last_step(tmp_path):
    logger = _Logger()
    trainer = _trainer(tmp_path, max_steps=6, eval_interval=3, callbacks=[C.MetricsCallback(logger, log_interval=100)])
    trainer.run()
    assert [r["step"] for r in logger.records if r.get("valid_loss") is not None] == [3, 6]
    assert trainer.engine.evals == 4


def test_finished_run_started_again_evaluates_before_on_end(tmp_path):
    logger = _Logger()
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[C.MetricsCallback(logger, log_interval=1)])
    trainer.state.step = 5  # resumed from the final checkpoint: no step runs
    assert trainer.run() == (0, "finished")
    assert logger.records == [{"step": 5, "valid_loss": pytest.approx(2.5)}] and logger.closed
    assert trainer.final_valid_loss == pytest.approx(2.5)


def test_no_validation_batches_no_final_record(tmp_path):
    logger = _Logger()
    trainer = _trainer(tmp_path, max_steps=2, valid=False, callbacks=[C.MetricsCallback(logger, log_interval=1)])
    trainer.run()
    assert trainer.final_valid_loss is None and all("valid_loss" not in r for r in logger.records)


def test_stopped_run_has_no_final_evaluation(tmp_path):
    from mgt_scale.train.trainer import StopTraining

    class Stop(Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 2:
                raise StopTraining(143, "preempted")

    trainer = _trainer(tmp_path, max_steps=5, callbacks=[Stop()])
    assert trainer.run() == (143, "preempted")
    assert trainer.final_valid_loss is None and trainer.engine.evals == 0


def test_final_evaluation_stays_interruptible(tmp_path):
    (tmp_path / "STOP").write_text("")
    logger = _Logger()
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[C.MetricsCallback(logger, log_interval=1)])
    trainer.run()
    assert trainer.final_valid_loss is None and trainer.engine.evals == 0
