# The one place that works out who this process is in a distributed run (rank, world size, master
# address/port) from whatever started it: the `deepspeed` launcher, `torchrun`, a SLURM `srun` step, or
# nothing at all (one process). `apply()` exports the result so `deepspeed.init_distributed()` and
# torch's env:// rendezvous find it. Pure Python (no torch import), so it is cheap to call anywhere.
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Literal, Mapping, MutableMapping

Launcher = Literal["deepspeed", "torchrun", "srun", "single"]

# apply() records the launcher it resolved, so a child process (or a second call) re-derives the same
# answer instead of mistaking exported RANK/WORLD_SIZE for the deepspeed launcher's.
LAUNCHER_VAR = "MGT_LAUNCHER"
PORT_BASE = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher
    node_rank: int

    def describe(self) -> str:
        return describe(self)


class DistEnvError(ValueError):
    """The environment names an impossible topology (e.g. RANK >= WORLD_SIZE)."""


# ----------------------------------------------------------------------------------------------
# SLURM host lists


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list (`node[01-03,07],gpu5`, `r1-n[1-2]-g[0-1]`) into host names, in order.

    Zero padding follows the written lower bound (`[08-10]` -> 08, 09, 10). Several bracket groups in
    one name expand as a product, left to right, like `scontrol show hostnames`.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise DistEnvError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur))
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        if "[" in item or "]" in item:
            raise DistEnvError(f"bad host name {item!r}")
        return [item]
    head, body, tail = item[: m.start()], m.group(1), item[m.end():]
    out = []
    for value in _expand_range_list(body, item):
        out.extend(head + value + rest for rest in _expand_one(tail))
    return out


def _expand_range_list(body: str, item: str) -> list[str]:
    values = []
    for rng in body.split(","):
        rng = rng.strip()
        if re.fullmatch(r"\d+", rng):
            values.append(rng)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", rng)
        if m is None:
            raise DistEnvError(f"bad range {rng!r} in host list {item!r}")
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise DistEnvError(f"descending range {rng!r} in host list {item!r}")
        width = len(lo)
        values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return values


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """First host of a SLURM node list: `scontrol show hostnames` when it is installed (it knows every
    syntax the site's SLURM accepts), else our parser."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30)
            if p.returncode == 0 and p.stdout.split():
                return p.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise DistEnvError(f"empty node list {nodelist!r}")
    return hosts[0]


def node_address(host: str, multi_node: bool = True) -> str:
    """The address the ranks reach `host` at. Its name when that resolves (to a non-loopback address
    if the job spans nodes: the usual cluster); else the NodeAddr slurm.conf gives the node (`scontrol
    show node`): where node names are not in DNS, or every node shares one hostname that resolves to
    loopback (the test cluster of tests/slurm/multicluster.py), the other nodes would dial 127.0.0.1."""
    try:
        resolved = socket.gethostbyname(host)
        if not (multi_node and resolved.startswith("127.")):
            return host  # resolves (and, for a job across nodes, not to loopback)
    except OSError:
        pass
    if shutil.which("scontrol"):
        try:
            p = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True, timeout=30)
            m = re.search(r"\bNodeAddr=(\S+)", p.stdout) if p.returncode == 0 else None
            if m:
                return m.group(1)
        except (OSError, subprocess.SubprocessError):
            pass
    return host


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM's compressed `SLURM_STEP_TASKS_PER_NODE` (`2(x3),1`)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise DistEnvError(f"bad tasks-per-node value {tasks_per_node!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if not 0 <= node_id < len(counts):
        raise DistEnvError(f"node id {node_id} outside tasks-per-node {tasks_per_node!r}")
    return counts[node_id]


# ----------------------------------------------------------------------------------------------
# Derivation


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def slurm_port(job_id: int) -> int:
    """A port every task of a job agrees on without talking: 20000 + job_id % 20000. A requeued job
    keeps its id and so its port; torch's store sets SO_REUSEADDR, so TIME_WAIT does not block it."""
    return PORT_BASE + job_id % PORT_SPAN


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise DistEnvError(f"{name} is not set") from None
    except ValueError:
        raise DistEnvError(f"{name}={env[name]!r} is not an integer") from None


def detect_launcher(env: Mapping[str, str]) -> Launcher:
    """Which launcher started this process. Launcher-set RANK/WORLD_SIZE win over SLURM variables: a
    `deepspeed` or `torchrun` started inside an sbatch script still sees the batch step's SLURM_*."""
    recorded = env.get(LAUNCHER_VAR)
    if recorded in ("deepspeed", "torchrun", "srun", "single") and "RANK" in env and "WORLD_SIZE" in env:
        return recorded  # type: ignore[return-value]
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env or "LOCAL_WORLD_SIZE" in env:
            return "torchrun"
        return "deepspeed"
    # SLURM_STEP_ID is set only inside an srun step: the batch script itself has SLURM_PROCID=0 and
    # SLURM_NTASKS=<all tasks>, and treating it as a rank would wait forever for peers.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return "srun"
    return "single"


def derive_dist_env(environ: Mapping[str, str] | None = None, use_scontrol: bool = True) -> DistEnv:
    """Rank, sizes and rendezvous point of this process, from its environment (see module header)."""
    env = os.environ if environ is None else environ
    launcher = detect_launcher(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        # launcher-set (or apply()-exported) variables: read them as they are
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
        node_rank = int(env.get("NODE_RANK") or env.get("GROUP_RANK") or env.get("CROSS_RANK")
                        or rank // max(local_world, 1))
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        if "MASTER_PORT" not in env:
            raise DistEnvError(f"{launcher}: RANK and WORLD_SIZE are set but MASTER_PORT is not")
        port = _int(env, "MASTER_PORT")
    elif launcher == "srun":
        rank = _int(env, "SLURM_PROCID")
        world = int(env.get("SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS"))
        local_rank = int(env.get("SLURM_LOCALID", "0"))
        node_rank = int(env.get("SLURM_NODEID", "0"))
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        local_world = tasks_on_node(per_node, node_rank) if per_node else world
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        # explicit MASTER_ADDR/MASTER_PORT (exported by the user or the batch script) are respected
        if env.get("MASTER_ADDR"):
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = first_host(nodelist, use_scontrol=use_scontrol)
            if use_scontrol:
                addr = node_address(addr, multi_node=world > local_world)
        else:
            raise DistEnvError("srun: none of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set")
        port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else slurm_port(_int(env, "SLURM_JOB_ID"))
    else:
        rank, world, local_rank, local_world, node_rank = 0, 1, 0, 1, 0
        addr = "127.0.0.1"
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port()
    dist = DistEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                   master_addr=addr, master_port=port, launcher=launcher, node_rank=node_rank)
    _check(dist)
    return dist


def _check(d: DistEnv) -> None:
    if d.world_size < 1:
        raise DistEnvError(f"world size {d.world_size} < 1 ({d.launcher})")
    if not 0 <= d.rank < d.world_size:
        raise DistEnvError(f"rank {d.rank} outside world size {d.world_size} ({d.launcher})")
    if not 0 <= d.local_rank < max(d.local_world_size, 1):
        raise DistEnvError(f"local rank {d.local_rank} outside local world size {d.local_world_size} "
                           f"({d.launcher})")
    if not 0 < d.master_port < 65536:
        raise DistEnvError(f"master port {d.master_port} out of range ({d.launcher})")


def apply(dist: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Export the variables torch's env:// rendezvous and `deepspeed.init_distributed()` read."""
    env = os.environ if environ is None else environ
    env["RANK"] = str(dist.rank)
    env["LOCAL_RANK"] = str(dist.local_rank)
    env["WORLD_SIZE"] = str(dist.world_size)
    env["LOCAL_WORLD_SIZE"] = str(dist.local_world_size)
    env["MASTER_ADDR"] = dist.master_addr
    env["MASTER_PORT"] = str(dist.master_port)
    env["NODE_RANK"] = str(dist.node_rank)
    env[LAUNCHER_VAR] = dist.launcher


def describe(dist: DistEnv) -> str:
    """One line for rank 0's log."""
    nodes = max(dist.world_size // max(dist.local_world_size, 1), 1)
    return (f"dist: launcher={dist.launcher} world={dist.world_size} ({nodes} node(s) x "
            f"{dist.local_world_size}) rank={dist.rank} local_rank={dist.local_rank} node={dist.node_rank} "
            f"master={dist.master_addr}:{dist.master_port}")
