# Both ways a rank runs the trainer (launch/pretrain.py: SLURM's srun and `deepspeed`; and `python -m
# mgt_scale.train.entry`: what `mgt train` launches) must end through entry.exit_rank, which flushes and
# calls os._exit. A rank that went through the interpreter's teardown has aborted in a C++ destructor
# after a clean finish ("terminate called without an active exception", exit 134), which SLURM's
# wrapper then requeued as a crash (fresh-clone CI, test_real_trainer_preempted_requeues_and_resumes_exactly).
# Seen from outside: an atexit handler (installed through sitecustomize) never runs, and the exit code
# is still the trainer's (2: bad config).
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("entry", [["launch/pretrain.py"], ["-m", "mgt_scale.train.entry"]],
                         ids=["launch-script", "module"])
def test_a_rank_exits_without_interpreter_teardown_and_keeps_its_code(tmp_path, entry):
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit\natexit.register(lambda: print('INTERPRETER TEARDOWN', flush=True))\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    r = subprocess.run([sys.executable, *entry, "--config", str(tmp_path / "missing.yaml")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "missing.yaml" in r.stderr
    assert "INTERPRETER TEARDOWN" not in r.stdout


def test_the_atexit_probe_sees_an_ordinary_exit(tmp_path):
    # the probe itself works: a plain interpreter exit runs it
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit\natexit.register(lambda: print('INTERPRETER TEARDOWN', flush=True))\n")
    r = subprocess.run([sys.executable, "-c", "import sys; sys.exit(2)"], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "INTERPRETER TEARDOWN" in r.stdout
