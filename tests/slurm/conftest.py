# Fixtures for tests/slurm: `slurm_cluster` brings up a real single-node SLURM (own munged, slurmctld,
# slurmd, generated slurm.conf, all under a temp dir, free ports) once per session and tears it down at
# the end; `multi_cluster` does the same for a 2-node cluster in network namespaces (multicluster.py),
# per test module; `make_run` writes a small run config + stand-in trainer controls and renders the job script.
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minicluster  # noqa: E402
import multicluster  # noqa: E402
from fake_runs import RunFactory  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = minicluster.missing_tools()
    if missing:
        pytest.skip(f"slurm-wlm not installed (missing: {', '.join(missing)}): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd and munged as root/munge: run the slurm tests as root")
    cluster = minicluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def multi_cluster():
    """A 2-node cluster (network namespaces, tests/slurm/multicluster.py), torn down at the end, also
    when a test fails. Skipped only where it cannot run: not root (namespaces, slurmd), or, outside CI,
    SLURM / iproute2 not installed; scripts/test.sh installs them where it can, so in CI they run."""
    if os.geteuid() != 0:
        pytest.skip("the multi-node cluster needs root (network namespaces, slurmd): run the tests as root")
    missing = multicluster.missing_tools()
    if missing:
        msg = f"slurm-wlm / iproute2 not installed (missing: {', '.join(missing)}): apt-get install -y slurm-wlm munge"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    cluster = multicluster.start(2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_run(tmp_path):
    return RunFactory(tmp_path)
