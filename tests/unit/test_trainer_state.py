# The trainer with a fake engine and loader (no DeepSpeed, in-process, fast), wired by the real builder
# (build.build_trainer: the real callbacks) with a real CheckpointManager, resumed by the real
# build.resume, logging to the real metrics.jsonl:
# - the step hooks run in their declared order, whatever the list order; names are unique;
# - Trainer.state_dict / load_state_dict: a run stopped at step k and resumed by a new trainer logs the
#   same records after k as the uninterrupted run; a checkpoint with the client state of the older
#   layout (callbacks' state at the top level) still resumes, every callback's state restored;
# - a streak of non-finite steps rolls back to the last checkpoint (Trainer.rollback), the data moves on;
# - StopTraining: the callbacks after the stopping hook see the step (metrics logs it), nothing saves.
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mgt_scale import exit_codes
from mgt_scale.config import load_config
from mgt_scale.engine.base import Engine, StepResult
from mgt_scale.train.build import Run, build_trainer, resume
from mgt_scale.train.trainer import Callback, Phase, StopTraining

SEQ = 4
TIMING = ("step_time", "tokens_per_s", "elapsed", "eta", "mfu")  # wall-clock fields: differ between runs


class FakeEngine:
    """The engine interface (mgt_scale.engine.base.Engine: mode, module, dp_rank, dp_size, set_lr, train_step,
    eval_loss, save, load; the probe and the consolidated state are not used here):
    one float64 weight vector fitted to the batches' values, plus a draw from torch's RNG in each step
    (so that a resume must restore the RNG too). A batch whose value is in `nan_values`, or a step while
    `nan_now()` is true (the fault hooks' NaN, in place of the real engines' lm_loss), gives a NaN loss;
    the update is then skipped, as the real engines do."""
    mode = "zero"
    dp_rank, dp_size = 0, 1

    def __init__(self, nan_values=()):
        self.module = torch.nn.Linear(SEQ, 1, bias=False).double()
        torch.nn.init.zeros_(self.module.weight)
        self.lr = 0.0
        self.nan_values = set(nan_values)
        self.nan_now = lambda: False
        self.loads = []

    def set_lr(self, lr):
        self.lr = lr

    def _loss(self, x):
        return float(((self.module.weight.data[0] - x) ** 2).mean())

    def train_step(self, micro_batches):
        w = self.module.weight.data[0]
        noise = float(torch.rand(()))
        x = torch.stack([b for b in micro_batches]).mean(0)
        if self.nan_now() or any(float(b[0]) in self.nan_values for b in micro_batches):
            return StepResult(math.nan, math.nan, skipped=True)
        loss = self._loss(x) + 1e-3 * noise
        grad = 2 * (w - x) / SEQ
        w -= self.lr * 100 * grad
        return StepResult(loss, float(grad.norm()))

    def eval_loss(self, batches):
        return sum(self._loss(b) for b in batches) / len(batches)

    def save(self, save_dir, tag, client_state):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.module.weight.data.clone(), "client_state": client_state}, d / "fake_states.pt")

    def load(self, load_dir, tag, universal=False):
        saved = torch.load(Path(load_dir) / tag / "fake_states.pt", weights_only=False)
        self.module.weight.data.copy_(saved["w"])
        self.loads.append(tag)
        return saved["client_state"]

    def probe_geometry(self, tokens, step, center=False):  # monitor.interval is 0 in these tests
        raise NotImplementedError

    def consolidated_state_dict(self):
        raise NotImplementedError

    def load_consolidated_state_dict(self, state):
        raise NotImplementedError


class FakeLoader:
    """Two micro batches per step; batch i holds the value i (so the data position shows in the loss)."""

    def __init__(self):
        self.consumed_samples = 0

    def next_step(self):
        out = [torch.full((SEQ,), float(self.consumed_samples + i), dtype=torch.float64) / 10 for i in range(2)]
        self.consumed_samples += 2
        return out

    def state_dict(self):
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state):
        self.consumed_samples = int(state["consumed_samples"])

    def close(self):
        pass


def config(tmp_path, *over):
    return load_config(None, ["data.synthetic=copy", f"run.dir={tmp_path}", "train.max_steps=8", "train.warmup_steps=1",
                              "train.log_interval=1", "checkpoint.interval=2", "checkpoint.keep_last=4",
                              "monitor.interval=0", "train.spike_zscore=0", *over])


def make_run(tmp_path, *over, nan_values=(), extra=()):
    cfg = config(tmp_path, *over)
    torch.manual_seed(cfg.train.seed)  # as build() does
    from mgt_scale.monitor.loggers import MultiLogger
    from mgt_scale.checkpoint.manager import CheckpointManager
    run = Run(cfg, SimpleNamespace(tokens_per_step=16, world_size=1), "fp32", 0, Path(tmp_path),
              {"tokenizer_sha256": None, "vocab_size": cfg.model.vocab_size, "source": "test"})
    run.engine, run.loader, run.valid = FakeEngine(nan_values), FakeLoader(), [torch.ones(SEQ, dtype=torch.float64)]
    run.manager = CheckpointManager(str(tmp_path), cfg, 0, 1)
    run.manager.data_tokenizer = run.data_tokenizer
    run.logger = MultiLogger()
    run.trainer = build_trainer(run)
    run.trainer.callbacks = run.trainer.callbacks + list(extra)
    return run


def records(run_dir) -> list[dict]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    nan = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v  # noqa: E731 (NaN != NaN)
    return [{k: nan(v) for k, v in r.items() if k not in TIMING} for r in rows]


class StopAt(Callback):
    """Stops the run at `step` (after the checkpoint hook: as a preemption does)."""
    name, order = "stop_at", Phase.PREEMPTION + 1

    def __init__(self, step, order=None):
        self.step = step
        if order is not None:
            self.order = order

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            raise StopTraining(exit_codes.PREEMPTED, f"stop at {self.step}")


def test_hooks_run_in_declared_order_not_list_order(tmp_path):
    run = make_run(tmp_path)
    assert isinstance(run.engine, Engine)  # the fake has the whole interface
    tr = run.trainer
    tr.callbacks = list(reversed(tr.callbacks))
    assert tr.step_hook_names() == ["nonfinite_guard.on_step_end", "monitor.on_step_end", "metrics.on_step_end",
                                    "nonfinite_guard.enforce", "checkpoint.on_step_end", "preemption.on_step_end"]
    seen = []

    class Spy(Callback):
        def __init__(self, name, order):
            self.name, self.order = name, order

        def on_start(self, trainer):
            seen.append(("start", self.name))

        def on_step_end(self, trainer, record):
            seen.append((record["step"], self.name))

    tr.callbacks = [Spy("late", 900), Spy("early", 1), Spy("between", Phase.METRICS + 1)]
    tr.train = config(tmp_path, "train.max_steps=1").train
    tr.run()
    assert seen == [("start", "early"), ("start", "between"), ("start", "late"), (1, "early"), (1, "between"),
                    (1, "late")]
    with pytest.raises(ValueError, match="unique"):
        tr.callbacks = [Spy("a", 1), Spy("a", 2)]


def test_stopped_at_k_and_resumed_by_a_new_trainer_logs_the_same_records(tmp_path):
    nan = {1.0, 1.2}  # the batches of steps 6 and 7: counters, window and skip flags in the state
    ref = make_run(tmp_path / "ref", nan_values=nan)
    resume(ref, "")
    assert ref.trainer.run() == (exit_codes.FINISHED, "finished")

    first = make_run(tmp_path / "b", nan_values=nan, extra=[StopAt(6)])
    resume(first, "")
    assert first.trainer.run()[0] == exit_codes.PREEMPTED  # stopped at 6, checkpoint of step 6 written
    second = make_run(tmp_path / "b", nan_values=nan)
    assert resume(second, "auto").name == "step_00000006"
    assert second.trainer.state.step == 6 and second.trainer.state.nonfinite_consecutive == 1
    assert second.trainer.run() == (exit_codes.FINISHED, "finished")

    assert records(tmp_path / "b") == records(tmp_path / "ref")  # steps 1-8 once each, same numbers
    assert second.trainer.state_dict() == ref.trainer.state_dict()
    assert torch.equal(second.engine.module.weight, ref.engine.module.weight)
    assert [r["step"] for r in records(tmp_path / "ref") if r.get("skipped")] == [6, 7]


def test_a_checkpoint_with_the_older_client_state_still_resumes(tmp_path):
    """Checkpoints written before Trainer.state_dict held each callback's state at the top level of the
    client state (`monitor`, `nonfinite_guard`) beside `loader` and `trainer`."""
    run = make_run(tmp_path)
    monitor = {"version": 1, "alarms": [{"step": 2, "layer": 0}], "num_alarms": 1, "num_rollbacks": 1,
               "last_probe_step": 2}
    old = {"loader": {"consumed_samples": 8}, "trainer": {"nonfinite_total": 2, "nonfinite_consecutive": 1},
           "monitor": monitor, "nonfinite_guard": {"window": [3.0, 2.5], "rollbacks": 1}}
    run.manager.save(run.engine, 4, old)
    assert resume(run, "auto").name == "step_00000004"
    tr = run.trainer
    assert (tr.state.step, tr.state.nonfinite_total, tr.state.nonfinite_consecutive) == (4, 2, 1)
    assert run.loader.consumed_samples == 8
    by_name = {cb.name: cb for cb in tr.callbacks}
    assert by_name["monitor"].state_dict() == monitor
    assert by_name["nonfinite_guard"].state_dict() == {"window": [3.0, 2.5], "rollbacks": 1}
    assert tr.state_dict()["callbacks"]["monitor"] == monitor
    assert run.trainer.run() == (exit_codes.FINISHED, "finished")  # and it trains on from there
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [5, 6, 7, 8]


def test_a_non_finite_streak_rolls_back_and_the_data_moves_on(tmp_path):
    # batches of steps 5, 6, 7 are NaN: the third in a row rolls back to step_00000006 (saved during the
    # streak; skipped steps leave the weights as at step 4)
    run = make_run(tmp_path, "train.max_consecutive_nonfinite=3", "train.nonfinite_policy=rollback",
                   nan_values={0.8, 1.0, 1.2})
    resume(run, "")
    assert run.trainer.run() == (exit_codes.FINISHED, "finished")
    recs = [r for r in records(tmp_path) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7, 7, 8]
    assert recs[6]["nonfinite_action"] == "rollback"  # logged before ENFORCE rolls back
    assert run.engine.loads == ["step_00000006"]
    assert [r["consumed_samples"] for r in recs] == [2 * i for i in range(1, 10)]  # not replayed
    assert all(math.isfinite(r["loss"]) for r in recs[7:])
    guard = next(cb for cb in run.trainer.callbacks if cb.name == "nonfinite_guard")
    assert guard.rollbacks == 1 and run.trainer.state.nonfinite_consecutive == 0


def test_the_fault_hook_makes_steps_nan_in_process(tmp_path, fault_hooks, monkeypatch):
    monkeypatch.setenv("MGT_FAULT_NAN_STEPS", "2,3")  # 0-based: the 3rd and 4th steps
    run = make_run(tmp_path, "train.max_consecutive_nonfinite=5")
    run.engine.nan_now = fault_hooks.nan_active
    resume(run, "")
    run.trainer.run()
    assert [r["step"] for r in records(tmp_path) if r.get("skipped")] == [3, 4]


def test_stop_training_lets_later_callbacks_see_the_step_and_nothing_saves(tmp_path):
    run = make_run(tmp_path, extra=[StopAt(4, order=Phase.MONITOR + 1)])  # before metrics and checkpoint
    resume(run, "")
    assert run.trainer.run() == (exit_codes.PREEMPTED, "stop at 4")
    recs = records(tmp_path)
    assert recs[-1]["step"] == 4 and recs[-1]["stopped"] == "stop at 4"  # logged by metrics' on_stopped_step
    assert run.manager.completed_steps() == [2]  # step 4 not saved, no final save of a stopped run
    assert run.trainer.final_valid_loss is None
