# Distributed tests: marked `distributed`, and preceded by a 2-rank preflight launch. If the launcher
# cannot bring two ranks up (a hung rendezvous, a broken DeepSpeed install), every distributed test
# errors at once with the launcher's output instead of each waiting out its own timeout.
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
PREFLIGHT_TIMEOUT_S = 240


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/distributed" in str(item.fspath):
            item.add_marker(pytest.mark.distributed)


@pytest.fixture(scope="session")
def _two_rank_preflight():
    from helpers import deepspeed_cmd, run_cmd
    script = Path(__file__).parent / "preflight_script.py"
    try:
        proc = run_cmd(deepspeed_cmd(2, str(script)), timeout=PREFLIGHT_TIMEOUT_S)
    except AssertionError as e:
        pytest.fail(f"2-rank DeepSpeed preflight failed; no distributed test can run:\n{e}", pytrace=False)
    assert proc.stdout.count("ok") >= 2, proc.stdout[-3000:]


@pytest.fixture(autouse=True)
def _needs_preflight(_two_rank_preflight):
    yield
