# A throw-away multi-node SLURM cluster on one machine, for tests/slurm/test_multinode.py and for trying
# multi-node jobs by hand: one munged and one slurmctld (root namespace), and 2-4 `slurmd -N nK`, each in
# its own network namespace with its own address on a private bridge. The nodes share the filesystem (as
# cluster nodes share a parallel filesystem) and the hostname (docs/OPERATORS.md, "Trying it without a
# cluster"). slurmd starts under `nsenter --net=...`, not `ip netns exec`, which would give it a /sys
# without the host's cgroup mounts.
#
#   python tests/slurm/multicluster.py up --nodes 2   # prints `export SLURM_CONF=...`
#   python tests/slurm/multicluster.py down [DIR]     # stops it (and any leftovers of a crashed one)
#
# Everything it creates carries the fixed prefix `mgtmn` (namespaces mgtmn-n1.., veth host ends
# mgtmn-v1.., bridge mgtmn-br, temp dirs mgtmn-slurm-*), so a start after a crash removes the leftovers
# first. Addresses: 10.211.77.0/24, only on that bridge (.254, the controller) and inside the namespaces
# (.1 .. .N, interface `eth0` in every namespace so GLOO_SOCKET_IFNAME=eth0 works on every node).
# One such cluster per machine at a time.
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minicluster  # noqa: E402
from minicluster import ClusterError, MiniCluster, _daemon, _exited, _free_port, _start_munge, _tail, _which  # noqa: E402

PREFIX = "mgtmn"
BRIDGE = f"{PREFIX}-br"
SUBNET = "10.211.77"
CTL_ADDR = f"{SUBNET}.254"
IFNAME = "eth0"  # the veth end inside every namespace


def netns(i: int) -> str:
    return f"{PREFIX}-n{i}"


def node_name(i: int) -> str:
    return f"n{i}"


def node_addr(i: int) -> str:
    return f"{SUBNET}.{i}"


def missing_tools() -> list[str]:
    need = minicluster.missing_tools()
    return need + [n for n in ("ip", "nsenter") if shutil.which(n, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([_which("ip"), *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)} -> {p.returncode}: {p.stderr.strip()}")
    return p


@dataclass
class MultiCluster(MiniCluster):
    """A running multi-node cluster; `nodes` are the SLURM node names (n1..nN), `addrs` their addresses."""

    nodes: tuple[str, ...] = ()
    addrs: tuple[str, ...] = ()

    def node_pids(self, i: int) -> list[int]:
        """Every process in node i's network namespace (slurmd, slurmstepd, the job's tasks)."""
        p = _ip("netns", "pids", netns(i), check=False)
        return [int(x) for x in p.stdout.split()]

    def kill_node(self, i: int) -> list[int]:
        """A node failure: SIGKILL every process in node i's namespace (slurmd, slurmstepd, the ranks),
        no signal to the job. Returns the pids killed."""
        pids = self.node_pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            _exited(pid)  # reap slurmd, our child
        self.procs.pop(f"slurmd-{node_name(i)}", None)
        return pids

    def restart_node(self, i: int) -> None:
        """Start node i's slurmd again (the node comes back; ReturnToService=2 makes it usable)."""
        self.procs[f"slurmd-{node_name(i)}"] = _start_slurmd(self, i)

    def stop(self) -> None:
        """Cancel the jobs, then tear everything down (processes in the namespaces first)."""
        if "slurmctld" in self.procs and not _exited(self.procs["slurmctld"]):
            try:
                self.run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False, timeout=15)
                for _ in range(30):
                    p = self.run("squeue", "-h", "-t", "all", "-o", "%T", check=False, timeout=15)
                    if not set(p.stdout.split()) & {"RUNNING", "COMPLETING", "CONFIGURING"}:
                        break
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        teardown(self.root)
        self.procs.clear()


def _start_slurmd(cluster: MultiCluster, i: int) -> int:
    name = node_name(i)
    return _daemon([_which("nsenter"), f"--net=/run/netns/{netns(i)}", _which("slurmd"), "-D",
                    "-f", str(cluster.conf), "-N", name], cluster.env, cluster.root / "log" / f"slurmd-{name}.stderr")


def _write_conf(root: Path, host: str, n: int, cpus: int, ctld_port: int, slurmd_port: int) -> None:
    nodes = "\n".join(f"NodeName={node_name(i)} NodeHostname={host} NodeAddr={node_addr(i)} CPUs={cpus} "
                      f"RealMemory=1024 State=UNKNOWN" for i in range(1, n + 1))
    names = ",".join(node_name(i) for i in range(1, n + 1))
    conf = f"""# generated by tests/slurm/multicluster.py: a {n}-node test cluster (network namespaces), state under {root}
ClusterName={PREFIX}{ctld_port}
SlurmctldHost={host}({CTL_ADDR})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
# a dead slurmd is marked DOWN after this many seconds without an answer (default 300)
SlurmdTimeout=20
MessageTimeout=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    (root / "slurm.conf").write_text(conf)


# ----------------------------------------------------------------------------------------------
# network


def _make_network(n: int) -> None:
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{CTL_ADDR}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for i in range(1, n + 1):
        ns, host_end, tmp = netns(i), f"{PREFIX}-v{i}", f"{PREFIX}-p{i}"
        _ip("netns", "add", ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", tmp)
        _ip("link", "set", tmp, "netns", ns)
        _ip("-n", ns, "link", "set", tmp, "name", IFNAME)
        _ip("-n", ns, "addr", "add", f"{node_addr(i)}/24", "dev", IFNAME)
        _ip("-n", ns, "link", "set", IFNAME, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "set", host_end, "master", BRIDGE)
        _ip("link", "set", host_end, "up")


def _our_netns() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX + "-")]


def _our_links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    names = [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.M)]
    return [x for x in names if x.startswith(PREFIX + "-")]


# ----------------------------------------------------------------------------------------------
# teardown (also of a crashed cluster's leftovers)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(50):
            pids = [p for p in pids if not _exited(p) and Path(f"/proc/{p}").exists()
                    and "(Z)" not in _stat(p)]
            if not pids:
                return
            time.sleep(0.1)


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2].join("()")
    except (OSError, IndexError):
        return ""


def teardown(root: Path | None = None) -> None:
    """Remove a cluster: every process in our namespaces, the daemons of `root` (or of every
    mgtmn-slurm-* dir: a crashed run's), the namespaces, veth host ends, the bridge, the state dirs."""
    for ns in _our_netns():
        _kill([int(x) for x in _ip("netns", "pids", ns, check=False).stdout.split()])
    roots = [root] if root else sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}-slurm-*"))
    for r in roots:
        pids = []
        for pf in list((r / "run").glob("*.pid")) + [r / "munge" / "munged.pid"]:
            try:
                pid = int(pf.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if str(r) in _cmdline(pid):  # only a daemon of that cluster (pid files outlive their process)
                pids.append(pid)
        _kill(pids)
    for ns in _our_netns():
        _ip("netns", "del", ns, check=False)
    for link in _our_links():  # deleting a namespace can leave the host end of its veth behind
        _ip("link", "del", link, check=False)
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# start


def start(n: int = 2, cpus: int = 2, timeout: float = 60) -> MultiCluster:
    """Bring up an n-node cluster (after removing leftovers of an earlier one) and wait until every
    node is idle. Raises ClusterError (everything torn down)."""
    if not 2 <= n <= 4:
        raise ClusterError(f"--nodes must be 2..4, got {n}")
    for name in ("slurmctld", "slurmd", "munged", "nsenter", "ip"):
        _which(name)
    teardown()
    host = socket.gethostname().split(".")[0]
    root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-slurm-"))
    os.chmod(root, 0o755)
    cluster = MultiCluster(root=root, node=node_name(1), cpus=cpus,
                           nodes=tuple(node_name(i) for i in range(1, n + 1)),
                           addrs=tuple(node_addr(i) for i in range(1, n + 1)))
    try:
        for d in ("state", "spool", "run", "log"):
            (root / d).mkdir()
        _make_network(n)
        _start_munge(cluster)
        _write_conf(root, host, n, cpus, _free_port(), _free_port())
        cluster.procs["slurmctld"] = _daemon([_which("slurmctld"), "-D", "-i", "-f", str(cluster.conf)], cluster.env,
                                            root / "log" / "slurmctld.stderr")
        for i in range(1, n + 1):
            cluster.procs[f"slurmd-{node_name(i)}"] = _start_slurmd(cluster, i)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, pid in cluster.procs.items():
                if name != "munged" and _exited(pid):
                    raise ClusterError(f"{name} exited at start:\n{_tail(root / 'log' / (name + '.stderr'))}\n"
                                       f"{cluster.log_tail(name)}")
            p = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=15)
            last = (p.stdout + p.stderr).strip()
            if p.returncode == 0 and last.split() == ["idle"] * n:
                return cluster
            time.sleep(0.5)
        raise ClusterError(f"nodes not idle after {timeout}s (sinfo: {last!r})\n{cluster.log_tail('slurmctld')}")
    except BaseException:
        cluster.stop()
        raise


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["up"]:
        count = int(args[2]) if len(args) == 3 and args[1] == "--nodes" else 2
        c = start(count)
        print(f"export SLURM_CONF={c.conf}  # nodes {dict(zip(c.nodes, c.addrs))}; "
              f"`python {sys.argv[0]} down {c.root}` stops it")
    elif args[:1] == ["down"] and len(args) <= 2:
        teardown(Path(args[1]) if len(args) == 2 else None)
        teardown()  # and anything else of ours (namespaces, links) left behind
    else:
        print(__doc__ or "usage: multicluster.py up [--nodes N] | down [DIR]")
        sys.exit(2)
