# Fault injection for the tests, outside the production code: wrappers installed on the trainer's step,
# on the engines' loss function, on the checkpoint callback's step hook, on the asynchronous checkpoint
# writer and on the checkpoint manager's manifest write, acting at the steps named by environment
# variables read at each call (a test may set them in the middle of a run):
#   MGT_FAULT_NAN_STEPS=4,5,6          the loss is NaN on every rank at these steps (0-based: the steps
#                                      completed before it, as train.fault_inject_nan_steps was): the
#                                      trainer's step turns NaN on, the engines' lm_loss multiplies by NaN
#   MGT_FAULT_STEP_SLEEP=0.5           every step ends with this sleep (seconds), after the checkpoint
#                                      callback's step hook: slow steps so that an outside signal lands mid-run
#   MGT_FAULT_SIGKILL_AT_STEP=S        rank 0 SIGKILLs itself after the checkpoint callback's hook of step S
#   MGT_FAULT_ASYNC_KILL=before_write|after_write   a rank SIGKILLs itself on the asynchronous
#                                      checkpoint writer's thread, before or after its DeepSpeed write
#   MGT_FAULT_KILL_DURING_SAVE=S       rank 0 dies (exit 137) while saving step S: every rank's files
#                                      written and hashed, no manifest yet
#   MGT_FAULT_KILL_AFTER_MANIFEST=S    rank 0 dies after the manifest of step S, before `latest_good` moves
# `sitecustomize.py` beside this file installs them in every Python process started with this folder on
# PYTHONPATH (the `mgt train` subprocesses of the tests, SLURM jobs submitted from such an environment,
# bench/gpu_check.sh); `install(monkeypatch)` in-process, with `nan_loss()` to make an engine's
# `train_step` called directly see a NaN loss.
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager

NAN_STEPS = "MGT_FAULT_NAN_STEPS"
KILL_DURING_SAVE = "MGT_FAULT_KILL_DURING_SAVE"
KILL_AFTER_MANIFEST = "MGT_FAULT_KILL_AFTER_MANIFEST"
STEP_SLEEP = "MGT_FAULT_STEP_SLEEP"
SIGKILL_AT_STEP = "MGT_FAULT_SIGKILL_AT_STEP"
ASYNC_KILL = "MGT_FAULT_ASYNC_KILL"

_nan = False  # inside a step of MGT_FAULT_NAN_STEPS (or `nan_loss()`): the engines' loss is NaN


def _steps(var: str) -> set[int]:
    return {int(v) for v in os.environ.get(var, "").replace(",", " ").split()}


def _die(msg: str) -> None:
    print(f"fault injection: {msg}", flush=True)
    sys.stderr.flush()
    os._exit(137)


def _sigkill(msg: str) -> None:
    print(f"fault injection: {msg}", flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def nan_active() -> bool:
    """Whether the engines' loss is NaN now (for a test's fake engine, which has no lm_loss to wrap)."""
    return _nan


@contextmanager
def nan_loss():
    """The engines' loss is NaN inside (every rank that enters it)."""
    global _nan
    before, _nan = _nan, True
    try:
        yield
    finally:
        _nan = before


def wrap_train_step(original):
    def train_step(self, step, micro_batches):
        if step in _steps(NAN_STEPS):
            with nan_loss():
                return original(self, step, micro_batches)
        return original(self, step, micro_batches)
    train_step.__wrapped__ = original
    return train_step


def wrap_loss(original):
    """The engines' lm_loss (as mgt_scale.engine.zero and mgt_scale.parallel.pipeline import it), NaN
    inside `nan_loss()`: the engine's own non-finite guard then acts as on a real NaN."""
    def lm_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss * float("nan") if _nan else loss
    lm_loss.__wrapped__ = original
    return lm_loss


def wrap_checkpoint_step_end(original):
    """CheckpointCallback.on_step_end, then the slow step / the SIGKILL (where the trainer had them)."""
    def on_step_end(self, trainer, record):
        out = original(self, trainer, record)
        nap = os.environ.get(STEP_SLEEP, "").strip()
        if nap:
            time.sleep(float(nap))
        kill = os.environ.get(SIGKILL_AT_STEP, "").strip()
        if kill and int(kill) == trainer.state.step and trainer.is_main:
            _sigkill(f"SIGKILL at step {trainer.state.step}")
        return out
    on_step_end.__wrapped__ = original
    return on_step_end


def wrap_background_save(original):
    """OwnFiles._background_save (the asynchronous writer's DeepSpeed write), with MGT_FAULT_ASYNC_KILL."""
    def _background_save(self, state_dict, path):
        point = os.environ.get(ASYNC_KILL, "").strip()
        if point == "before_write":
            _sigkill("SIGKILL during an asynchronous save (before_write)")
        out = original(self, state_dict, path)
        if point == "after_write":
            _sigkill("SIGKILL during an asynchronous save (after_write)")
        return out
    _background_save.__wrapped__ = original
    return _background_save


def wrap_write_manifest(original):
    def write_manifest(tag_dir, meta, *args, **kwargs):
        step = int(meta["step"])
        if step in _steps(KILL_DURING_SAVE):
            _die(f"killing rank 0 while saving {tag_dir.name} (DeepSpeed files written, no manifest)")
        out = original(tag_dir, meta, *args, **kwargs)
        if step in _steps(KILL_AFTER_MANIFEST):
            _die(f"killing rank 0 after the manifest of {tag_dir.name}")
        return out
    write_manifest.__wrapped__ = original
    return write_manifest


# module -> [(object in it, attribute, wrapper)]; the object "" is the module itself
TARGETS = {
    "mgt_scale.train.trainer": [("Trainer", "train_step", wrap_train_step)],
    "mgt_scale.engine.zero": [("", "lm_loss", wrap_loss)],
    "mgt_scale.parallel.pipeline": [("", "lm_loss", wrap_loss)],
    "mgt_scale.train.resume_callbacks": [("CheckpointCallback", "on_step_end", wrap_checkpoint_step_end)],
    "mgt_scale.checkpoint.writer": [("OwnFiles", "_background_save", wrap_background_save)],
    "mgt_scale.checkpoint.manager": [("", "write_manifest", wrap_write_manifest)],
}


def patch_module(name: str, module) -> None:
    """Install the wrappers that belong to module `name` (just imported)."""
    for owner, attr, wrap in TARGETS.get(name, ()):
        obj = getattr(module, owner) if owner else module
        setattr(obj, attr, wrap(getattr(obj, attr)))


def install(monkeypatch) -> None:
    """In-process (a pytest fixture): the same wrappers, undone by `monkeypatch` after the test."""
    import importlib
    for name, targets in TARGETS.items():
        module = importlib.import_module(name)
        for owner, attr, wrap in targets:
            obj = getattr(module, owner) if owner else module
            monkeypatch.setattr(obj, attr, wrap(getattr(obj, attr)))
