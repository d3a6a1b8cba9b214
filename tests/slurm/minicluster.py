# A throw-away single-node SLURM cluster for the tests in tests/slurm (and for trying templates by hand):
# its own munged (own key and socket), slurmctld and slurmd on free ports, every file under one temp dir.
# It never touches /etc/slurm or a SLURM that may already run on the machine.
#
#   python tests/slurm/minicluster.py up      # prints `export SLURM_CONF=...`; `down DIR` stops it
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
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE"})


class ClusterError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    """Names of the programs this cluster needs that are not installed (empty list: all there)."""
    need = ["slurmctld", "slurmd", "munged", "sbatch", "scontrol", "srun", "sinfo", "scancel", "squeue"]
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [n for n in need if shutil.which(n, path=path) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise ClusterError(f"{name} not found (apt-get install -y slurm-wlm munge)")
    return found


@dataclass
class MiniCluster:
    """A running single-node cluster. `env` is what SLURM clients need (SLURM_CONF)."""

    root: Path
    node: str
    cpus: int
    procs: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    # ------------------------------------------------------------------------------------------
    # client helpers

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise ClusterError(f"{' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def submit(self, script: str | Path, *sbatch_args: str) -> int:
        """sbatch a script file; returns the job id."""
        out = self.run("sbatch", "--parsable", *sbatch_args, str(script)).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} once the job is gone; MinJobAge keeps it 10 min)."""
        p = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if p.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for m in re.finditer(r"(\w[\w:/]*)=(\S*)", p.stdout):
            fields.setdefault(m.group(1), m.group(2))
        return fields

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int, states=FINAL_STATES, timeout: float = 120, poll: float = 0.5,
             min_restarts: int = 0) -> dict[str, str]:
        """Wait until the job is in one of `states` (and has been restarted at least `min_restarts`
        times); returns its scontrol fields. Raises ClusterError with the slurmctld log tail on timeout."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states and int(info.get("Restarts", "0")) >= min_restarts:
                return info
            time.sleep(poll)
        raise ClusterError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n"
                           f"--- slurmctld.log tail ---\n{self.log_tail('slurmctld')}")

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        path = self.root / "log" / f"{daemon}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def stop(self) -> None:
        """Cancel this cluster's jobs (slurmstepd outlives slurmd), stop the daemons this object started
        (by pid, newest first) and remove the temp dir."""
        if "slurmctld" in self.procs and _alive(self.procs["slurmctld"]):
            try:
                self.run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False, timeout=15)
                for _ in range(60):
                    p = self.run("squeue", "-h", "-t", "all", "-o", "%T", check=False, timeout=15)
                    if not set(p.stdout.split()) & {"RUNNING", "COMPLETING", "PENDING", "CONFIGURING"}:
                        break
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in reversed(DAEMONS):
            pid = self.procs.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                if _exited(pid) or not _alive(pid):  # _exited reaps our own children (no zombies)
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _exited(pid)
        shutil.rmtree(self.root, ignore_errors=True)


def _write_conf(root: Path, node: str, cpus: int, mem_mb: int, ctld_port: int, slurmd_port: int) -> None:
    conf = f"""# generated by tests/slurm/minicluster.py: a single-node test cluster, all state under {root}
ClusterName=mgttest{ctld_port}
SlurmctldHost={node}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
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
# keep finished jobs visible to `scontrol show job` for the assertions
MinJobAge=600
# short timeouts so that the tests do not wait on defaults meant for big clusters
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
NodeName={node} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    (root / "slurm.conf").write_text(conf)


def start(cpus: int | None = None, timeout: float = 60) -> MiniCluster:
    """Bring a cluster up and wait until its node is idle. Raises ClusterError (daemons stopped)."""
    for name in ("slurmctld", "slurmd", "munged"):
        _which(name)
    node = socket.gethostname().split(".")[0]
    ncpu = cpus or os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="mgt-slurm-"))
    os.chmod(root, 0o755)
    cluster = MiniCluster(root=root, node=node, cpus=ncpu)
    try:
        for d in ("state", "spool", "run", "log"):
            (root / d).mkdir()
        _start_munge(cluster)
        _write_conf(root, node, ncpu, 1024, _free_port(), _free_port())
        env = cluster.env
        cluster.procs["slurmctld"] = _daemon([_which("slurmctld"), "-D", "-i", "-f", str(cluster.conf)], env,
                                            root / "log" / "slurmctld.stderr")
        cluster.procs["slurmd"] = _daemon([_which("slurmd"), "-D", "-f", str(cluster.conf), "-N", node], env,
                                         root / "log" / "slurmd.stderr")
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                if _exited(cluster.procs[name]):
                    raise ClusterError(f"{name} exited at start:\n{_tail(root / 'log' / (name + '.stderr'))}\n"
                                       f"{cluster.log_tail(name)}")
            p = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=15)
            last = (p.stdout + p.stderr).strip()
            if p.returncode == 0 and last in ("idle", "mixed", "allocated"):
                return cluster
            time.sleep(0.5)
        raise ClusterError(f"node not idle after {timeout}s (sinfo: {last!r})\n{cluster.log_tail('slurmctld')}\n"
                           f"{cluster.log_tail('slurmd')}")
    except BaseException:
        cluster.stop()
        raise


def _exited(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _daemon(cmd: list[str], env: dict, log: Path) -> int:
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True).pid


def _start_munge(cluster: MiniCluster) -> None:
    """Own munged: key, socket, pid and log under root/munge, owned by the munge user (munged refuses
    group/world-writable dirs and, as root, wants --force; running it as `munge` is the supported way)."""
    mdir = cluster.root / "munge"
    mdir.mkdir()
    os.chmod(mdir, 0o755)  # munged wants the socket dir searchable by all, writable by its owner only
    try:
        pw = pwd.getpwnam("munge")
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        uid = gid = None
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(128))
    os.chmod(key, 0o400)
    cmd = [_which("munged"), "-F", f"--socket={mdir}/munge.socket", f"--key-file={key}",
           f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed"]
    if uid is not None and os.geteuid() == 0:
        for p in (mdir, key):
            os.chown(p, uid, gid)
        cmd = [_which("runuser"), "-u", "munge", "--"] + cmd
    elif os.geteuid() == 0:
        cmd.append("--force")
    cluster.procs["munged"] = _daemon(cmd, dict(os.environ), cluster.root / "log" / "munged.stderr")
    sock = mdir / "munge.socket"
    for _ in range(100):
        if sock.exists():
            return
        if _exited(cluster.procs["munged"]):
            break
        time.sleep(0.1)
    raise ClusterError(f"munged did not start:\n{_tail(cluster.root / 'log' / 'munged.stderr')}\n"
                       f"{_tail(mdir / 'munged.log')}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "up":
        c = start()
        print(f"export SLURM_CONF={c.conf}  # pids {c.procs}")
    elif len(sys.argv) == 3 and sys.argv[1] == "down":
        root = Path(sys.argv[2])
        for pidfile in (root / "run" / "slurmd.pid", root / "run" / "slurmctld.pid", root / "munge" / "munged.pid"):
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(__doc__ or "usage: minicluster.py up | down DIR")
        sys.exit(2)
