# The real trainer on a 2-node SLURM cluster on this machine (tests/slurm/multicluster.py: each slurmd
# in its own network namespace with its own address; fixture `multi_cluster` in conftest.py), 1 CPU rank
# per node, gloo over the namespaces' bridge (GLOO_SOCKET_IFNAME=eth0), fp32, configs/tiny_synthetic.yaml
# on random synthetic data. Shows (issue 31):
#   1. a 2-node job trains ZeRO-3 and pipeline mode to the end with the losses of the same job on one
#      node with the same world size (2 tasks), to 1e-6;
#   2. node failure: node n2 (its slurmd, slurmstepd and rank) SIGKILLed mid-run, no signal to the job:
#      rank 0 ends on the broken collective, SLURM ends the job (NODE_FAIL), the job script requeues it
#      without n2 on 1 node (--min-nodes 1), the trainer reshards the last complete ZeRO-3 checkpoint to
#      world 1 (dp 2 -> 1, global batch and consumed samples kept) and finishes; losses after the resume
#      within 1e-3 of the uninterrupted 2-node run's;
#   3. preemption of a 2-node job (USR1 to the batch shell, as --signal=B:USR1@N does): checkpoint,
#      requeue, resume on 2 nodes, losses bit-identical to the uninterrupted run;
#   4. the deepspeed launcher with a hostfile naming the namespaces' addresses, one `deepspeed --no_ssh
#      --node_rank R` per node (what its pdsh runner would start on each host; no pdsh/sshd here): the
#      losses of the srun run, bit for bit.
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_runs import read_log
from mgt_scale.cluster import slurm as slurm_cli
from mgt_scale.cluster.dist_env import free_port

pytestmark = [pytest.mark.slurm, pytest.mark.multinode, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_synthetic.yaml"
ENTRY = REPO / "launch" / "pretrain.py"
STEPS = 12
TRAIN_SETS = (f"train.max_steps={STEPS}", "train.log_interval=1", "data.synthetic=random",
              "parallel.precision=fp32", "checkpoint.interval=4", "checkpoint.keep_last=3")
PIPELINE_SETS = ("parallel.mode=pipeline", "parallel.pipeline_stages=2", "parallel.zero_stage=0", "train.max_steps=6")
# what a site sets for the ranks: the interface of the nodes' network (every namespace names it eth0)
JOB_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}
FAULT_HOOKS = REPO / "tests" / "fault_hooks"


def _render(run_dir: Path, nodes: int, tasks: int, *sets: str, extra: tuple[str, ...] = ()) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "job.sbatch"
    argv = ["render", "--config", str(CONFIG), "--nodes", str(nodes), "--tasks-per-node", str(tasks),
            "--time", "00:15:00", "--signal-seconds", "60", "--python", sys.executable, "--workdir", str(run_dir),
            "--output", str(script), *extra]
    for s in (f"run.dir={run_dir}", f"run.name={run_dir.name}", *TRAIN_SETS, *sets):
        argv += ["--set", s]
    assert slurm_cli.main(argv) == 0
    return script


def _with_fault_hooks(env: dict) -> dict:
    """MGT_FAULT_* act through the test-only hooks (tests/fault_hooks): on the job's PYTHONPATH (sbatch
    --export=ALL passes it to the job and srun to the ranks)."""
    if any(k.startswith("MGT_FAULT_") for k in env):
        env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(FAULT_HOOKS), os.environ.get("PYTHONPATH")])))
    return env


def _submit(cluster, script: Path, **env: str) -> int:
    _wait_idle(cluster)  # a node still completing the last job would make this one wait or start small
    exports = ",".join(f"{k}={v}" for k, v in {**JOB_ENV, **_with_fault_hooks(env)}.items())
    return int(cluster.run("sbatch", "--parsable", f"--export=ALL,{exports}", str(script)).stdout.split(";")[0])


def _wait_idle(cluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        if states and set(states) == {"idle"}:
            return
        time.sleep(0.5)
    raise AssertionError(f"nodes not idle after {timeout}s: {states}\n{cluster.log_tail('slurmctld')}")


def _run(cluster, run_dir: Path, nodes: int, tasks: int, *sets: str) -> tuple[dict, str]:
    jid = _submit(cluster, _render(run_dir, nodes, tasks, *sets))
    info = cluster.wait(jid, timeout=600)
    log = read_log(run_dir, jid)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    return info, log


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [r for r in _records(run_dir) if "loss" in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step logged twice in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def _wait_steps(cluster, run_dir: Path, jid: int, n: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while len(_losses(run_dir)) < n:
        state = cluster.state(jid)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {jid} {state}:\n" + read_log(run_dir, jid)[-4000:]
        assert time.monotonic() < deadline, f"fewer than {n} steps after {timeout}s:\n" + read_log(run_dir, jid)[-4000:]
        time.sleep(0.2)


def _close(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) for s in a)


@pytest.fixture(scope="module")
def two_node_run(multi_cluster, tmp_path_factory):
    """The uninterrupted 2-node x 1-rank ZeRO-3 job: test 1's subject, the reference of tests 2 and 3."""
    run_dir = tmp_path_factory.mktemp("mn") / "zero3-2nodes"
    info, log = _run(multi_cluster, run_dir, 2, 1)
    return run_dir, info, log


def test_two_nodes_match_one_node(multi_cluster, two_node_run, tmp_path):
    run_dir, info, log = two_node_run
    addr = multi_cluster.addrs[0]
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    # the launcher: ranks from SLURM, MASTER_ADDR the first node's address (its name resolves nowhere)
    assert re.search(rf"dist: launcher=srun world=2 \(2 node\(s\) x 1\) rank=0 local_rank=0 node=0 master={addr}:\d+",
                     log), log[-4000:]
    assert "stages 1 x dp 2" in log and "per-rank exits [0 0] -> 0" in log, log[-4000:]
    one = tmp_path / "zero3-1node"
    _, log1 = _run(multi_cluster, one, 1, 2)
    assert "world=2 (1 node(s) x 2)" in log1, log1[-4000:]
    two, ref = _losses(run_dir), _losses(one)
    assert sorted(two) == list(range(1, STEPS + 1))
    zdiff = _close(two, ref)
    # pipeline mode, 2 stages: one stage per node vs both stages on one node
    _, plog = _run(multi_cluster, tmp_path / "pipe-2nodes", 2, 1, *PIPELINE_SETS)
    _, plog1 = _run(multi_cluster, tmp_path / "pipe-1node", 1, 2, *PIPELINE_SETS)
    assert "stages 2 x dp 1" in plog and "world=2 (2 node(s) x 1)" in plog, plog[-4000:]
    p2, p1 = _losses(tmp_path / "pipe-2nodes"), _losses(tmp_path / "pipe-1node")
    assert sorted(p2) == list(range(1, 7))
    pdiff = _close(p2, p1)
    print(f"\n2 nodes vs 1 node, world 2: zero3 max |dloss| {zdiff:.1e} over {STEPS} steps, "
          f"pipeline max |dloss| {pdiff:.1e} over 6 steps")
    assert zdiff <= 1e-6 and pdiff <= 1e-6


def test_node_failure_requeues_on_the_remaining_node(multi_cluster, two_node_run, tmp_path):
    reference = _losses(two_node_run[0])
    ref_consumed = {r["step"]: r["consumed_samples"] for r in _records(two_node_run[0]) if "loss" in r}
    run_dir = tmp_path / "nodefail"
    # --min-nodes 1: after a node failure the job may resume on the one node left
    script = _render(run_dir, 2, 1, extra=("--min-nodes", "1"))
    jid = _submit(multi_cluster, script, MGT_FAULT_STEP_SLEEP="1")  # slow steps: the kill lands mid-run
    try:
        _wait_steps(multi_cluster, run_dir, jid, 6)
        info = multi_cluster.job(jid)
        assert (info["NodeList"], info["BatchHost"]) == ("n[1-2]", "n1"), info
        killed = multi_cluster.kill_node(2)  # slurmd, slurmstepd, the rank: SIGKILL, nothing to the job
        t_kill = time.monotonic()
        print(f"\nnode failure: SIGKILL to every process of node n2 ({len(killed)} pids) after step "
              f"{max(_losses(run_dir))}")
        info = multi_cluster.wait(jid, timeout=600, min_restarts=1)
        took = time.monotonic() - t_kill
    finally:
        multi_cluster.restart_node(2)
    log = read_log(run_dir, jid)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-6000:]
    # rank 0 noticed: gloo on the dead peer, exit 1 (a crash to the job script), no exit record of rank 1
    assert "Connection closed by peer" in log or "Connection reset by peer" in log, log[-6000:]
    assert "per-rank exits [1] -> 1" in log, log[-6000:]
    assert "node failure: n2 down (exit 1 on the surviving ranks); requeue 1/20 without n2, " \
           "on the 1 remaining node(s)" in log, log[-6000:]
    # the requeued job: n2 excluded, one node, world 1 (dp 2 -> 1), the same global batch
    assert (info["NodeList"], info["NumNodes"], info["ExcNodeList"]) == ("n1", "1", "n2"), info
    assert "start: 1 node(s) [n1], requeues so far 1/20" in log
    assert "stages 1 x dp 2; global batch 8 = micro 4 x accum 1 x dp 2" in log, log[-6000:]
    assert "world=1 (1 node(s) x 1)" in log and "stages 1 x dp 1; global batch 8 = micro 4 x accum 2 x dp 1" in log
    m = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", log)
    assert m and "resharding through a universal checkpoint" in log, log[-6000:]
    resumed = int(m.group(2))
    assert resumed in (4, 8), log[-6000:]  # the last complete checkpoint before the kill (interval 4)
    assert "training finished (exit 0): done" in log
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)  # each step once
    consumed = {r["step"]: r["consumed_samples"] for r in _records(run_dir) if "loss" in r}
    assert consumed == ref_consumed, (consumed, ref_consumed)  # the exact data position: 8 samples a step
    assert all(got[s] == reference[s] for s in range(1, resumed + 1))  # before the failure: the 2-node run
    diffs = {s: abs(got[s] - reference[s]) for s in range(resumed + 1, STEPS + 1)}
    diff = max(diffs.values())
    print("|loss - uninterrupted| by step after the resume:", {s: f"{d:.1e}" for s, d in diffs.items()})
    print(f"job {jid}: NODE_FAIL, requeued without n2 ({took:.0f}s from the kill to the end), resumed at step "
          f"{resumed} on n1, data-parallel size 2 -> 1 (global batch 8 kept), consumed samples as uninterrupted; "
          f"max |loss - uninterrupted| after the resume {diff:.2e} over steps {resumed + 1}..{STEPS}")
    assert diff < 1e-3
    _wait_idle(multi_cluster)  # n2 back (ReturnToService=2) for the next tests


def test_preempted_two_node_job_resumes_exactly(multi_cluster, two_node_run, tmp_path):
    reference = _losses(two_node_run[0])
    run_dir = tmp_path / "preempt"
    jid = _submit(multi_cluster, _render(run_dir, 2, 1), MGT_FAULT_STEP_SLEEP="0.5")
    _wait_steps(multi_cluster, run_dir, jid, 4)
    multi_cluster.run("scancel", "--batch", "--signal=USR1", str(jid))  # what --signal=B:USR1@N does
    info = multi_cluster.wait(jid, timeout=600, min_restarts=1)
    log = read_log(run_dir, jid)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-6000:]
    m = re.search(r"preempted \(signal SIGUSR1\): checkpointing step (\d+)", log)
    assert m and "] requeue: preempted" in log, log[-6000:]
    stopped = int(m.group(1))
    assert log.count("world=2 (2 node(s) x 1)") == 2 and info["NodeList"] == "n[1-2]", log[-6000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in log
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    print(f"\npreempted at step {stopped}, requeued, resumed on 2 nodes: losses identical to the uninterrupted run")
    assert got == reference  # bit for bit


def test_deepspeed_launcher_hostfile_across_nodes(multi_cluster, two_node_run, tmp_path):
    """`deepspeed --hostfile` naming the nodes' addresses. Its default runner reaches the hosts with pdsh
    (ssh), which these namespaces do not run; `--no_ssh --node_rank R` on each node starts what the pdsh
    runner would start there (deepspeed.launcher.launch with that node rank)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in multi_cluster.addrs))
    run_dir = tmp_path / "ds"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(JOB_ENV)
    port = str(free_port())
    procs = []
    for i in (1, 2):
        cmd = ["nsenter", f"--net=/run/netns/mgtmn-n{i}", str(Path(sys.executable).with_name("deepspeed")),
               "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i - 1), "--master_addr",
               multi_cluster.addrs[0], "--master_port", port, str(ENTRY), "--config", str(CONFIG)]
        for s in (f"run.dir={run_dir}", "run.name=ds", *TRAIN_SETS):
            cmd += ["--set", s]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        finally:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
    out = outs[0]
    assert re.search(rf"dist: launcher=deepspeed world=2 \(2 node\(s\) x 1\) rank=0 local_rank=0 node=0 "
                     rf"master={re.escape(multi_cluster.addrs[0])}:{port}", out), out[-6000:]
    got, srun = _losses(run_dir), _losses(two_node_run[0])
    print(f"\ndeepspeed --hostfile ({', '.join(multi_cluster.addrs)}) --no_ssh: losses identical to srun's")
    assert got == srun
