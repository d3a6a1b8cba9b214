# Who writes and hashes a checkpoint's files. DeepSpeed writes every shard through its engine's
# `checkpoint_engine.save(state_dict, path)`; OwnFiles wraps that engine so each rank knows the files
# it wrote and hashes them itself, right after its own write (page cache hot, in parallel across
# ranks), instead of rank 0 hashing every rank's files serially while the others wait. In async mode
# (checkpoint.async_save) `save` only snapshots the state (tensors copied to host memory) and a
# background thread writes and hashes the files while the step loop goes on; CheckpointManager moves
# the manifest and `latest_good` only once every rank's writes are complete (checkpoint.py).
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch

from mgt_scale.logs import get_logger
from mgt_scale.checkpoint.manifest import file_record

log = get_logger(__name__)


def snapshot(obj):
    """A copy of a state dict that later training steps cannot change: tensors copied to host memory,
    containers rebuilt, everything else shared (ints, strings, configs are not mutated in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        items = [(k, snapshot(v)) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """One thread that runs write jobs in order; `wait()` blocks until all submitted jobs are done and
    re-raises the first error one of them hit."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._pending = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="mgt-ckpt-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._cv:
            self._pending += 1
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self._error is None:
                    job()
            except BaseException as e:  # surfaced by wait(), on the training thread
                self._error = e
            finally:
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    def idle(self) -> bool:
        with self._cv:
            return self._pending == 0

    def wait(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._pending == 0)
        err, self._error = self._error, None
        if err is not None:
            raise err


class OwnFiles:
    """Wraps a DeepSpeed CheckpointEngine: records the files this rank writes with their size and
    sha256 (`records`, relative to the checkpoint directory) and, with a BackgroundWriter, writes them
    asynchronously. Everything else is the wrapped engine's."""

    def __init__(self, inner, rank: int):
        self.inner, self.rank = inner, rank
        self.writer: Optional[BackgroundWriter] = None
        self.tag_dir: Optional[Path] = None
        self.records: dict[str, dict] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def start(self, tag_dir: Path, writer: Optional[BackgroundWriter]) -> None:
        self.tag_dir, self.writer, self.records = Path(tag_dir), writer, {}

    def save(self, state_dict, path):
        path = Path(path)
        if self.writer is None:
            self.inner.save(state_dict, str(path))
            self._record(path)
            return
        frozen = snapshot(state_dict)

        def job():
            self._background_save(frozen, path)
            self._record(path)
        self.writer.submit(job)

    def _background_save(self, state_dict, path: Path) -> None:
        """The wrapped engine's write, on the writer thread. A method of its own so that the fault hooks of
        the tests (tests/fault_hooks) can kill the process just before or after it."""
        self.inner.save(state_dict, str(path))

    def _record(self, path: Path) -> None:
        if self.tag_dir is None:
            return
        try:
            rel = str(path.resolve().relative_to(self.tag_dir.resolve()))
        except ValueError:  # written outside the checkpoint directory: not ours to list
            return
        self.records[rel] = file_record(path, self.rank)


def own_files(engine, rank: int) -> Optional[OwnFiles]:
    """The OwnFiles wrapper of `engine`'s DeepSpeed checkpoint engine (installed on first use), or None
    for an engine without one (the manager then hashes unclaimed files itself, as before)."""
    ds = getattr(engine, "engine", None)
    inner = getattr(ds, "checkpoint_engine", None)
    if inner is None:
        return None
    if not isinstance(inner, OwnFiles):
        inner = OwnFiles(inner, rank)
        ds.checkpoint_engine = inner
    return inner
