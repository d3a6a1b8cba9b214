# The README's main command, `bash scripts/demo.sh`, run as a user runs it: on a copy of this checkout
# with no .venv, no data/ and no runs/ (a fresh clone), so its own setup, tokenizer training, ZeRO-3
# training, report and summary all execute. A fresh clone once failed at `mgt prep` (missing data/)
# while every other test passed; this is the test that would have caught it.
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.readme


def _checkout_copy(dest: Path) -> Path:
    """Copy the files a clone of this working tree would have: tracked and untracked-but-not-ignored
    (so uncommitted edits are tested too), never .venv, data/, runs/ or build outputs."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.fail("this test copies the checkout with `git ls-files`: run it from a git clone")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    return dest


def _user_env() -> dict:
    """The caller's environment without this test run's virtual environment on PATH, so the demo
    has to find (and build) its own."""
    env = dict(os.environ)
    venv = env.pop("VIRTUAL_ENV", None)
    own_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p not in (own_bin, venv and str(Path(venv) / "bin")))
    env.pop("PYTHONPATH", None)
    env["WANDB_MODE"] = "offline"
    return env


def _demo(repo: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, (f"bash scripts/demo.sh exited {proc.returncode}\n"
                                  f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr (tail) ---\n{proc.stderr[-4000:]}")
    return proc


def test_readme_demo_runs_from_a_fresh_checkout_and_again_on_top_of_its_own_run(tmp_path):
    repo = _checkout_copy(tmp_path / "clone")
    assert not (repo / ".venv").exists() and not (repo / "data").exists() and not (repo / "runs").exists()
    env = _user_env()

    first = _demo(repo, env)
    summary = re.search(r"steps (\d+)\s+loss ([\d.]+) -> ([\d.]+)", first.stdout)
    assert summary, f"no demo summary in its output:\n{first.stdout[-3000:]}"
    steps, loss0, loss1 = int(summary[1]), float(summary[2]), float(summary[3])
    assert steps == 300
    # vocabulary 2048: an untrained model starts near ln(2048) = 7.62; 300 steps on real text go well below
    assert 6.5 < loss0 < 8.5 and loss1 < loss0 - 2.0, (loss0, loss1)

    run = repo / "runs" / "demo"
    assert (repo / "data" / "stdlib" / "manifest.json").is_file()
    assert (run / "report" / "report.md").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 300, status
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    geometry = [json.loads(line) for line in (run / "geometry.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 300
    # the residual stream after the embedding (layer 0) and after each of the 8 blocks
    assert [layer["layer"] for layer in geometry[-1]["layers"]] == list(range(9))
    assert all(0.0 < layer["eff_rank_norm"] <= 1.0 for layer in geometry[-1]["layers"])

    # The same command again, as an operator re-running the README would: it reuses the venv and the
    # tokenized data, resumes the finished run (--resume auto) and must neither fail nor train past 300.
    manifest = repo / "data" / "stdlib" / "manifest.json"
    prepared_at = manifest.stat().st_mtime_ns
    second = _demo(repo, env)
    assert manifest.stat().st_mtime_ns == prepared_at, "the second demo tokenized the data again"
    assert "resum" in second.stdout.lower(), second.stdout[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 300, status
    rerun = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in rerun) == 300
