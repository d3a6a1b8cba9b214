# The fast tier's guard (tests/conftest.py): a test with no tier marker cannot start `mgt train` or the
# deepspeed launcher as a subprocess (it would take 30-90 s); other subprocesses still run.
import subprocess
import sys

import pytest


def test_a_fast_test_cannot_start_mgt_train():
    for argv in ([sys.executable, "-m", "mgt_scale.cli", "train", "--config", "x.yaml"],
                 [sys.executable, "-m", "mgt_scale.commands", "train"], ["mgt", "train", "--dry-run"], ["deepspeed", "--num_gpus", "2", "launch/pretrain.py"],
                 "mgt train --config x.yaml"):
        with pytest.raises(AssertionError, match="mark it @pytest.mark.slow"):
            subprocess.run(argv, capture_output=True, shell=isinstance(argv, str), timeout=60)


def test_other_subprocesses_run():
    assert subprocess.run([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60).returncode == 3
    assert subprocess.run([sys.executable, "-c", "print('train')"], capture_output=True, text=True,
                          timeout=60).stdout == "train\n"


@pytest.mark.slow
def test_a_marked_test_may(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2  # CONFIG_ERROR: the missing file, reached without the guard in the way
