# In-process multi-rank tests of collective logic (after OLMo-core's `run_distributed_test`):
# `run_ranks(fn, world_size, *args)` starts `world_size` processes (torch.multiprocessing, forkserver:
# see START_METHOD), joins them into one gloo process group over a FileStore in a fresh temporary
# directory (no port to pick, none to collide on), calls `fn(rank, world_size, *args)` in each and
# returns the ranks' return values in rank order. An exception in any rank is raised here as
# `RankError` naming the rank, with its traceback; a rank that does not finish within `timeout`
# seconds (a collective that one rank never joins) is killed and named. No DeepSpeed, no launcher.
#
# Starting the processes is most of the cost: importing torch, 1-2 s of CPU (many seconds on a busy
# 2-core machine), once per forkserver (preloaded) or once per rank (spawn). `RankPool(world_size)`
# keeps the ranks and their group alive across calls (`pool.run(fn, *args)`), so that a test pays only
# for its own work; the `rank_pool` fixture (tests/unit/conftest.py) hands out one pool per world size
# for the whole session. A call in which a rank times out or dies, or raises while another gives no
# answer, restarts the pool's processes (at its next call): its other ranks may be stuck in a collective.
# Rules for `fn`: a module-level function (pickled by name) with picklable arguments and result; it
# must not destroy the process group, and it must undo what it changes in its process (monkeypatches,
# environment): the next test's function runs in the same process.
from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import torch.multiprocessing as mp

# forkserver: a clean server process (not a fork of pytest and its threads) imports torch once and
# forks the ranks from it, 3 ranks in ~1 s after the first pool instead of an import of torch per rank;
# "spawn" works too (set MGT_MULTIRANK_START=spawn), at a torch import per rank
START_METHOD = os.environ.get("MGT_MULTIRANK_START", "forkserver")
DEFAULT_TIMEOUT_S = 120.0  # the first call of a pool also waits for the ranks to import torch


class RankError(AssertionError):
    """A rank raised, died or timed out; `rank` names it."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank
        self.every_rank_answered = False  # True: no rank is left inside a collective, the pool goes on


def _worker(rank: int, world_size: int, store_path: str, tasks, results) -> None:
    import torch.distributed as dist
    # collectives.py / ckpt_collective.py ask torch.distributed for the world; set the usual variables
    # too, for code that reads them (mgt_scale.logs' rank prefix)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((-1, rank, False, f"process group: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        seq, fn, args = task
        try:
            value = fn(rank, world_size, *args)
            pickle.dumps(value)  # a result that cannot travel fails here, named, not in the queue's thread
            results.put((seq, rank, True, value))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, with the traceback
            results.put((seq, rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class RankPool:
    """`world_size` ranks in one gloo group, kept alive between `run` calls."""

    def __init__(self, world_size: int, timeout: float = DEFAULT_TIMEOUT_S):
        self.world_size, self.timeout = world_size, timeout
        self._procs: list = []
        self._seq = 0

    def _start(self) -> None:
        ctx = mp.get_context(START_METHOD)
        if START_METHOD == "forkserver":
            ctx.set_forkserver_preload(["torch", "torch.distributed"])  # before the server starts; else ignored
        self._tmp = tempfile.TemporaryDirectory(prefix="mgt_multirank_")
        store = os.path.join(self._tmp.name, "store")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, store, self._tasks[r], self._results),
                                   daemon=True) for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def close(self, force: bool = False) -> None:
        """Stops the ranks: asks them to leave, then kills those still there (at once with `force`)."""
        if not self._procs:
            return
        for q in self._tasks:
            q.put(None)
        deadline = time.monotonic() + (0 if force else 2)  # idle ranks leave at once
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        for q in (*self._tasks, self._results):
            q.cancel_join_thread()  # never wait at exit to flush into a killed rank's pipe
            q.close()
        self._tmp.cleanup()
        self._procs = []

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, fn: Callable, *args: Any, timeout: Optional[float] = None) -> list:
        """`[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]`, each on its rank.
        Raises RankError for the first rank (by rank) that raised, died, or had no result within
        `timeout` seconds; unless every rank answered, the ranks are restarted at the next call."""
        if not self._procs:
            self._start()
        self._seq += 1
        seq, timeout = self._seq, self.timeout if timeout is None else timeout
        for q in self._tasks:
            q.put((seq, fn, args))
        try:
            return self._collect(seq, timeout)
        except RankError as e:
            if not e.every_rank_answered:
                self.close(force=True)  # its other ranks may wait in a collective forever: restart at the next call
            raise
        except BaseException:
            self.close(force=True)
            raise

    def _collect(self, seq: int, timeout: float) -> list:
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                if any(not ok for ok, _ in got.values()):
                    break  # raised below: the failing rank, not the ones it left waiting
                missing = [r for r in range(self.world_size) if r not in got]
                raise RankError(missing[0], f"no result within {timeout:.0f} s (ranks without one: {missing}; "
                                            "a collective that not every rank joined?)")
            try:
                s, rank, ok, value = self._results.get(timeout=min(left, 0.2))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if r not in got and p.exitcode is not None]
                if dead:
                    self._drain(seq, got, wait=0.5)  # what it put just before exiting
                    dead = [r for r in dead if r not in got]
                    if dead:
                        raise RankError(dead[0], f"exited with code {self._procs[dead[0]].exitcode} without a result")
                continue
            if s in (seq, -1):
                got[rank] = (ok, value)
                if not ok:  # give the others a moment to report their own errors, then stop
                    deadline = min(deadline, time.monotonic() + 2.0)
        failed = sorted(r for r, (ok, _) in got.items() if not ok)
        if failed:
            error = RankError(failed[0], got[failed[0]][1])
            error.every_rank_answered = len(got) == self.world_size
            raise error
        return [got[r][1] for r in range(self.world_size)]

    def _drain(self, seq: int, got: dict, wait: float) -> None:
        time.sleep(wait)
        while True:
            try:
                s, rank, ok, value = self._results.get_nowait()
            except queue.Empty:
                return
            if s in (seq, -1):
                got[rank] = (ok, value)


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """One call of `fn` on `world_size` fresh ranks (RankPool.run), which are stopped afterwards."""
    with RankPool(world_size, timeout) as pool:
        return pool.run(fn, *args, timeout=timeout)
