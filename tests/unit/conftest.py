# Shared fixtures for the unit tests (`rank_pool`, at the end: gloo ranks for collective logic, multirank.py;
# `fault_hooks`: the test-only fault injection, in-process).
# `inprocess_dist`: a one-rank gloo process group for tests that build a DeepSpeed engine in the pytest
# process. It sets the torchrun-style variables only for the module that uses it and restores them
# afterwards: left behind, they make every later `mgt train` subprocess believe it is rank 0 of a
# torchrun world of 1 (which silently ignores --num-ranks and rendezvous on a dead port).
import os

import pytest

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def inprocess_dist():
    from mgt_scale.cluster.dist_env import free_port
    saved = {k: os.environ.get(k) for k in DIST_VARS}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port())})
    from mgt_scale.parallel.ds_runtime import import_deepspeed, init_distributed
    deepspeed = import_deepspeed()
    init_distributed(deepspeed)  # a no-op when an earlier module already initialised it
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_leaked_dist_env(request):
    """Fails the test (not a later, unrelated one) that leaves torchrun variables behind."""
    before = {k: os.environ.get(k) for k in DIST_VARS}
    yield
    if "inprocess_dist" in request.fixturenames:
        return
    after = {k: os.environ.get(k) for k in DIST_VARS}
    assert before == after, f"test leaked distributed environment variables: {before} -> {after}"


@pytest.fixture(scope="session")
def rank_pool():
    """`rank_pool(n)`: a multirank.RankPool of n gloo ranks, shared by the session's tests (started at
    first use, stopped at the end), so that a multi-rank test does not pay for starting processes."""
    from multirank import RankPool
    pools = {}

    def get(world_size: int):
        if world_size not in pools:
            pools[world_size] = RankPool(world_size)
        return pools[world_size]
    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture
def fault_hooks(monkeypatch):
    """In-process fault injection (tests/fault_hooks/mgt_fault_hooks.py): the wrappers that the
    sitecustomize there installs in `mgt train` subprocesses, undone after the test. Set MGT_FAULT_* with
    `monkeypatch.setenv`; the wrappers read them at each call."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "fault_hooks" / "mgt_fault_hooks.py"
    spec = importlib.util.spec_from_file_location("mgt_fault_hooks", path)
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    hooks.install(monkeypatch)
    return hooks
