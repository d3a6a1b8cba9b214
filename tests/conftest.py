# The fast tier stays fast: a test with none of the tier markers (slow, distributed, slurm, multinode,
# readme; pyproject.toml) that starts `mgt train` or the deepspeed launcher as a subprocess, or builds
# DeepSpeed in-process (the `inprocess_dist` fixture of tests/unit/conftest.py), fails, naming the
# command and the marker to add. Such a run takes 30-90 s on the 2-core test machine; the
# fast tier (`bash scripts/test.sh --fast`) is meant to take about 2 minutes in all. subprocess.Popen
# is wrapped for those tests only (subprocess.run / call / check_output go through it); the spawned
# ranks of tests/unit/multirank.py do not use it.
import os
import subprocess

import pytest

TIER_MARKERS = ("slow", "distributed", "slurm", "multinode", "readme")


def _starts_training(args) -> bool:
    argv = [str(a) for a in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
    if len(argv) == 1:  # a shell string
        argv = argv[0].split()
    names = [os.path.basename(a) for a in argv]
    for i, a in enumerate(argv[:-1]):
        if (a in ("mgt_scale.cli", "mgt_scale.commands", "mgt_scale.commands.main") or names[i] == "mgt") \
                and argv[i + 1] == "train":
            return True
    return any(n in ("deepspeed", "torchrun") for n in names[:3])


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_training(request):
    if any(request.node.get_closest_marker(m) for m in TIER_MARKERS):
        yield
        return
    if "inprocess_dist" in request.fixturenames:
        pytest.fail("a fast-tier test builds DeepSpeed in-process (the inprocess_dist fixture): "
                    "mark it @pytest.mark.slow (tests/conftest.py)", pytrace=False)
    real = subprocess.Popen

    class GuardedPopen(real):
        def __init__(self, args, *a, **k):
            if _starts_training(args):
                shown = " ".join(map(str, [args] if isinstance(args, (str, bytes)) else args))[:200]
                raise AssertionError(f"a fast-tier test starts a training subprocess ({shown}): "
                                     "mark it @pytest.mark.slow (tests/conftest.py)")
            super().__init__(args, *a, **k)
    # not through `monkeypatch`: requested here, it would be set up before tests/unit/conftest.py's
    # _no_leaked_dist_env and undone after that fixture's check, which would then see the test's setenv
    subprocess.Popen = GuardedPopen
    try:
        yield
    finally:
        subprocess.Popen = real
