# Unit tests of mgt_scale.cluster.dist_env: launcher detection and rank/size/master derivation for the
# deepspeed launcher, torchrun, srun steps and a lone process, plus the SLURM host-list parser. Pure
# Python: no SLURM needed (scontrol is bypassed with use_scontrol=False).
import socket

import pytest

from mgt_scale.cluster import dist_env as de


@pytest.mark.parametrize("nodelist,hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5,node[1-2]", ["gpu5", "node1", "node2"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("rack1-n[1-2]", ["rack1-n1", "rack1-n2"]),
    ("r[1-2]-n[0-1]", ["r1-n0", "r1-n1", "r2-n0", "r2-n1"]),
    ("a[3],b", ["a3", "b"]),
    ("x[001-002]y", ["x001y", "x002y"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert de.expand_nodelist(nodelist) == hosts
    assert de.first_host(nodelist, use_scontrol=False) == hosts[0]


@pytest.mark.parametrize("bad", ["node[01-03", "node01-03]", "n[3-1]", "n[a-b]", "n[]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(de.DistEnvError):
        de.expand_nodelist(bad)


@pytest.mark.parametrize("spec,node,count", [("2", 0, 2), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1), ("4,1,3", 2, 3)])
def test_tasks_on_node(spec, node, count):
    assert de.tasks_on_node(spec, node) == count


def test_tasks_on_node_rejects():
    with pytest.raises(de.DistEnvError):
        de.tasks_on_node("2(x2)", 2)
    with pytest.raises(de.DistEnvError):
        de.tasks_on_node("two", 0)


def test_deepspeed_launcher():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
           "CROSS_RANK": "2", "CROSS_SIZE": "4", "LOCAL_SIZE": "2",
           # an sbatch script that runs `deepspeed` leaves the batch step's SLURM variables around
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-4]"}
    d = de.derive_dist_env(env, use_scontrol=False)
    assert d == de.DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=2, master_addr="10.0.0.1",
                           master_port=29500, launcher="deepspeed", node_rank=2)


def test_torchrun():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "host-a", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    d = de.derive_dist_env(env, use_scontrol=False)
    assert (d.launcher, d.rank, d.local_rank, d.world_size, d.local_world_size, d.node_rank) == \
        ("torchrun", 3, 1, 4, 2, 1)
    assert (d.master_addr, d.master_port) == ("host-a", 1234)


def _srun_env(**over):
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    env.update(over)
    return env


def test_srun():
    d = de.derive_dist_env(_srun_env(), use_scontrol=False)
    assert d == de.DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, master_addr="gpu07",
                           master_port=20000 + 123456 % 20000, launcher="srun", node_rank=1)


def test_srun_same_master_on_every_rank():
    envs = [_srun_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r % 2), SLURM_NODEID=str(r // 2)) for r in range(4)]
    ds = [de.derive_dist_env(e, use_scontrol=False) for e in envs]
    assert [d.rank for d in ds] == [0, 1, 2, 3]
    assert {(d.master_addr, d.master_port, d.world_size) for d in ds} == {("gpu07", 23456, 4)}


def test_srun_respects_explicit_master():
    d = de.derive_dist_env(_srun_env(MASTER_ADDR="ib-gpu07", MASTER_PORT="31000"), use_scontrol=False)
    assert (d.master_addr, d.master_port, d.launcher) == ("ib-gpu07", 31000, "srun")


def test_batch_script_is_not_a_rank():
    # the sbatch shell has SLURM_PROCID=0 and SLURM_NTASKS=<all tasks> but no step: one process, not rank 0 of 4
    env = _srun_env(SLURM_PROCID="0")
    del env["SLURM_STEP_ID"]
    d = de.derive_dist_env(env, use_scontrol=False)
    assert (d.launcher, d.rank, d.world_size) == ("single", 0, 1)


def test_single_process_gets_a_free_port():
    d = de.derive_dist_env({}, use_scontrol=False)
    assert (d.launcher, d.rank, d.world_size, d.local_rank, d.node_rank) == ("single", 0, 1, 0, 0)
    assert d.master_addr == "127.0.0.1"
    with socket.socket() as s:  # the port was free a moment ago, so binding it works
        s.bind(("127.0.0.1", d.master_port))


def test_apply_roundtrip_keeps_launcher():
    for env in (_srun_env(), {}):
        d = de.derive_dist_env(env, use_scontrol=False)
        out = dict(env)
        de.apply(d, out)
        for var, val in (("RANK", d.rank), ("LOCAL_RANK", d.local_rank), ("WORLD_SIZE", d.world_size),
                         ("MASTER_ADDR", d.master_addr), ("MASTER_PORT", d.master_port)):
            assert out[var] == str(val)
        assert de.derive_dist_env(out, use_scontrol=False) == d


@pytest.mark.parametrize("env", [
    {"RANK": "4", "WORLD_SIZE": "4", "MASTER_PORT": "1"},
    {"RANK": "0", "WORLD_SIZE": "0", "MASTER_PORT": "1"},
    {"RANK": "0", "WORLD_SIZE": "2"},
    {"RANK": "x", "WORLD_SIZE": "2", "MASTER_PORT": "1"},
])
def test_bad_environments_raise(env):
    with pytest.raises(de.DistEnvError):
        de.derive_dist_env(env, use_scontrol=False)


def test_describe_is_one_line():
    d = de.derive_dist_env(_srun_env(), use_scontrol=False)
    line = de.describe(d)
    assert "\n" not in line and "launcher=srun" in line and "world=4" in line and "gpu07:23456" in line


FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo mgt-unresolvable-a; echo mgt-unresolvable-b;;
  "show node") echo "NodeName=$4 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.211.9.$( [ "$4" = mgt-unresolvable-a ] && echo 1 || echo 2) NodeHostName=vm";;
  *) exit 1;;
esac
"""


def test_srun_master_is_the_first_nodes_address_where_its_name_does_not_resolve(tmp_path, monkeypatch):
    """Node names outside DNS (the multi-node test cluster, sites without node DNS): MASTER_ADDR is the
    first node's NodeAddr from `scontrol show node`, not a name the other ranks cannot resolve."""
    fake = tmp_path / "scontrol"
    fake.write_text(FAKE_SCONTROL)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    env = _srun_env(SLURM_STEP_NODELIST="mgt-unresolvable-[a-b]", SLURM_JOB_NODELIST="mgt-unresolvable-[a-b]")
    d = de.derive_dist_env(env)
    assert (d.master_addr, d.world_size, d.local_world_size) == ("10.211.9.1", 4, 2)
    # a name that resolves (here: localhost, for a job on one node) is kept as it is
    assert de.node_address("localhost", multi_node=False) == "localhost"
