# End-to-end tests of the rendered sbatch script on a real single-node SLURM (fixture in conftest.py),
# with the stand-in trainer (fake_trainer.py, 2 ranks, gloo): a clean finish, preemption by USR1 to the
# batch shell with requeue and exact resumption, the real pre-timeout --signal, the ~2 min requeue delay
# with and without the StartTime reset, collapse (86) not requeued, bounded crash retries, --chain,
# and a run dir full of shell metacharacters.
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from fake_runs import expected_records, rank_exits, read_log, records, starts

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parents[2]


def _wait_steps(run_dir: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(records(run_dir, 0)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} steps after {timeout}s"
        time.sleep(0.2)


def _assert_exact(run_dir: Path, max_steps: int, world: int = 2) -> None:
    for r in range(world):
        assert records(run_dir, r) == expected_records(max_steps, world, r), f"rank {r} records differ"


def _stamp(log: str, pattern: str) -> datetime:
    m = re.search(r"\[mgt-slurm (\S+ \S+) [^\]]*\] " + pattern, log)
    assert m, f"no log line matching {pattern!r}:\n{log}"
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")


def test_two_ranks_finish(slurm_cluster, make_run):
    run_dir, script = make_run("finish", max_steps=20, control={"step_seconds": 0.02})
    jid = slurm_cluster.submit(script)
    info = slurm_cluster.wait(jid, timeout=120)
    log = read_log(run_dir, jid)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    _assert_exact(run_dir, 20)  # both ranks, world size 2, local ranks 0/1, launcher srun
    assert "dist: launcher=srun world=2 (1 node(s) x 2) rank=0" in log
    assert f"master={slurm_cluster.node}:{20000 + jid % 20000}" in log
    assert "per-rank exits [0 0] -> 0" in log and "training finished (exit 0)" in log
    assert "--resume auto" in log


def test_preempted_run_requeues_and_resumes_exactly(slurm_cluster, make_run):
    run_dir, script = make_run("preempt", max_steps=60, control={"step_seconds": 0.1, "resume_step_seconds": 0.02})
    jid = slurm_cluster.submit(script)
    _wait_steps(run_dir, 10)
    # what --signal=B:USR1@N does before the wall time: USR1 to the batch shell only
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(jid))
    info = slurm_cluster.wait(jid, timeout=150, min_restarts=1)
    log = read_log(run_dir, jid)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    _assert_exact(run_dir, 60)  # no step lost, none repeated
    resumed = [s for s in starts(run_dir) if "restart=1" in s]
    assert len(resumed) == 2 and all("from_step=0" not in s for s in resumed), starts(run_dir)
    assert "received SIGUSR1: forwarding" in log and rank_exits(log, 85), log
    # the StartTime reset: SLURM would hold a requeued job ~121 s (cred_expire); here it restarts at once
    delay = (_stamp(log, r"start: .*requeues so far 1/") - _stamp(log, "requeue: ")).total_seconds()
    assert delay < 30, log
    assert "requeued job start time reset to now" in log


def test_requeue_without_start_reset_waits(slurm_cluster, make_run):
    run_dir, script = make_run("nodelay", max_steps=200, control={"step_seconds": 0.1},
                               extra=["--no-reset-start-time"])
    jid = slurm_cluster.submit(script)
    _wait_steps(run_dir, 3)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(jid))
    info = slurm_cluster.wait(jid, "PENDING", timeout=60, min_restarts=1)
    begin = datetime.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S")
    slurm_cluster.run("scancel", str(jid))
    assert (begin - datetime.now()).total_seconds() > 60, info  # held back ~2 minutes without the option


def test_wall_time_signal_checkpoints_and_requeues(slurm_cluster, make_run):
    # the real pre-timeout path: --time 1 min, USR1 55 s before the end (SLURM checks every ~30 s, so it
    # comes 5-35 s into the job). The first run cannot finish in time; the resumed run is quick.
    run_dir, script = make_run("walltime", max_steps=200, time="00:01:00",
                               control={"step_seconds": 0.25, "resume_step_seconds": 0.01},
                               extra=["--signal-seconds", "55"])
    jid = slurm_cluster.submit(script)
    info = slurm_cluster.wait(jid, timeout=200, min_restarts=1)
    log = read_log(run_dir, jid)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert int(info["Restarts"]) >= 1 and "received SIGUSR1" in log
    _assert_exact(run_dir, 200)


def test_collapse_alarm_is_not_requeued(slurm_cluster, make_run):
    run_dir, script = make_run("collapse", max_steps=50, control={"step_seconds": 0.02, "collapse_at": 5})
    jid = slurm_cluster.submit(script)
    info = slurm_cluster.wait(jid, timeout=120)
    log = read_log(run_dir, jid)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "86:0", "0"), log
    assert "STOP, no requeue: collapse alarm (exit 86)" in log
    time.sleep(3)
    assert slurm_cluster.job(jid)["JobState"] == "FAILED" and len(starts(run_dir)) == 2
    assert len(records(run_dir, 0)) == 5


def test_crash_is_retried_a_bounded_number_of_times(slurm_cluster, make_run):
    run_dir, script = make_run("crash", max_steps=50, control={"step_seconds": 0.02, "crash_at": 3},
                               extra=["--max-crash-retries", "2"])
    jid = slurm_cluster.submit(script)
    info = slurm_cluster.wait(jid, timeout=200, min_restarts=2)
    log = read_log(run_dir, jid)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "2"), log
    assert info["ExitCode"] != "0:0"
    assert log.count("] requeue: crash (exit ") == 2 and "2 retries spent (max 2)" in log
    assert len([s for s in starts(run_dir) if s.startswith("rank=0")]) == 3  # first start + 2 retries
    time.sleep(3)
    assert slurm_cluster.job(jid)["JobState"] == "FAILED"


def test_chain_continues_after_requeue_budget(slurm_cluster, make_run, tmp_path):
    run_dir, _ = make_run("chain", max_steps=60, control={"step_seconds": 0.1, "resume_step_seconds": 0.02})
    cmd = [sys.executable, "-m", "mgt_scale.cluster.slurm", "submit", "--config", str(run_dir / "cfg.yaml"),
           "--tasks-per-node", "2", "--time", "00:10:00", "--signal-seconds", "30", "--chain", "2",
           "--max-requeues", "0", "--entry", str(REPO / "tests" / "slurm" / "fake_trainer.py"),
           "--workdir", str(run_dir)]
    p = subprocess.run(cmd, env=slurm_cluster.env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    first, second = (int(x) for x in p.stdout.split()[-2:])
    assert "Dependency=singleton" in slurm_cluster.run("scontrol", "show", "job", str(second)).stdout
    assert slurm_cluster.state(second) == "PENDING"
    _wait_steps(run_dir, 10)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(first))
    info1 = slurm_cluster.wait(first, timeout=60)
    assert (info1["ExitCode"], info1["Restarts"]) == ("85:0", "0"), read_log(run_dir, first)
    info2 = slurm_cluster.wait(second, timeout=120)
    assert (info2["JobState"], info2["ExitCode"]) == ("COMPLETED", "0:0"), read_log(run_dir, second)
    _assert_exact(run_dir, 60)
    assert "requeue budget is spent (0/0)" in read_log(run_dir, first)


def test_hostile_run_dir_end_to_end(slurm_cluster, make_run, tmp_path):
    hostile = tmp_path / "a b \"q\" 'x' $(touch PWNED1) ; touch PWNED2 `touch PWNED3` 50% #h &"
    run_dir, script = make_run("hostile", max_steps=5, control={"step_seconds": 0.01}, run_dir=hostile / "run")
    jid = slurm_cluster.submit(script)
    info = slurm_cluster.wait(jid, timeout=120)
    logs = list((hostile / "run" / "slurm").glob(f"hostile-{jid}.out"))
    assert len(logs) == 1, f"job log not where asked: {list(tmp_path.rglob('*.out'))}"
    assert info["JobState"] == "COMPLETED", logs[0].read_text()
    _assert_exact(run_dir, 5)
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path(os.getcwd()).glob("PWNED*"))


def test_scancel_is_not_undone_by_requeue(slurm_cluster, make_run):
    run_dir, script = make_run("cancel", max_steps=300, control={"step_seconds": 0.1})
    jid = slurm_cluster.submit(script)
    _wait_steps(run_dir, 5)
    slurm_cluster.run("scancel", str(jid))  # TERM: the ranks save and exit 85, but the user asked to stop
    info = slurm_cluster.wait(jid, "CANCELLED", timeout=60)
    time.sleep(4)
    log = read_log(run_dir, jid)
    info = slurm_cluster.job(jid)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
    assert "not requeued: the job was cancelled" in log and rank_exits(log, 85), log
