# Fault injection for the tests, outside the trainer's code: wrappers installed on the trainer's step and
# on the checkpoint manager's manifest write, acting at the steps named by environment variables read at
# each call (a test may set them in the middle of a run):
#   MGT_FAULT_NAN_STEPS=4,5,6          the engine's step makes the loss NaN at these steps (0-based: the
#                                      steps completed before it, as train.fault_inject_nan_steps was)
#   MGT_FAULT_KILL_DURING_SAVE=S       rank 0 dies (exit 137) while saving step S: every rank's files
#                                      written and hashed, no manifest yet
#   MGT_FAULT_KILL_AFTER_MANIFEST=S    rank 0 dies after the manifest of step S, before `latest_good` moves
# `sitecustomize.py` beside this file installs them in every Python process started with this folder on
# PYTHONPATH (the `mgt train` subprocesses of the tests); `install(monkeypatch)` in-process.
from __future__ import annotations

import os
import sys

NAN_STEPS = "MGT_FAULT_NAN_STEPS"
KILL_DURING_SAVE = "MGT_FAULT_KILL_DURING_SAVE"
KILL_AFTER_MANIFEST = "MGT_FAULT_KILL_AFTER_MANIFEST"


def _steps(var: str) -> set[int]:
    return {int(v) for v in os.environ.get(var, "").replace(",", " ").split()}


def _die(msg: str) -> None:
    print(f"fault injection: {msg}", flush=True)
    sys.stderr.flush()
    os._exit(137)


def wrap_train_step(original):
    def train_step(self, step, micro_batches):
        if step in _steps(NAN_STEPS):
            return self.engine.train_step(micro_batches, inject_nan=True)
        return original(self, step, micro_batches)
    train_step.__wrapped__ = original
    return train_step


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


def patch_module(name: str, module) -> None:
    """Install the wrappers that belong to module `name` (just imported)."""
    if name == "mgt_scale.train.trainer":
        module.Trainer.train_step = wrap_train_step(module.Trainer.train_step)
    elif name == "mgt_scale.checkpoint.manager":
        module.write_manifest = wrap_write_manifest(module.write_manifest)


def install(monkeypatch) -> None:
    """In-process (a pytest fixture): the same wrappers, undone by `monkeypatch` after the test."""
    from mgt_scale.checkpoint import manager as checkpoint
    from mgt_scale.train import trainer
    monkeypatch.setattr(trainer.Trainer, "train_step", wrap_train_step(trainer.Trainer.train_step))
    monkeypatch.setattr(checkpoint, "write_manifest", wrap_write_manifest(checkpoint.write_manifest))
