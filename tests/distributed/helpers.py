# Launch helpers for the distributed engine tests: write a config to a temp dir, start N CPU ranks
# with the `deepspeed` launcher (gloo), read the per-step losses back from RUN_DIR/metrics.jsonl.
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FAULT_HOOKS = ROOT / "tests" / "fault_hooks"  # test-only fault injection (MGT_FAULT_*), see its files
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(FAULT_HOOKS), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def deepspeed_cmd(num_ranks: int, *args: str) -> list[str]:
    launcher = VENV_BIN / "deepspeed"
    return [str(launcher), "--num_gpus", str(num_ranks), "--no_local_rank", "--master_port", str(free_port()), *args]


def run_cmd(cmd: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run in its own session (with `env` added to the environment); on timeout kill the whole group
    (launcher and ranks)."""
    popen = subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        out, err = popen.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-6000:]}\n{err[-3000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(cfg: dict, tmp: Path, num_ranks: int, name: str, env: dict | None = None) -> tuple[list[float], str]:
    """Run `mgt_scale.train.entry` on `num_ranks` ranks (with `env` added to the environment); returns
    (per-step losses, stdout)."""
    run_dir = tmp / name
    cfg = dict(cfg, run={"dir": str(run_dir), "name": name})
    path = write_config(cfg, tmp / f"{name}.yaml")
    if num_ranks == 1:
        cmd = [sys.executable, "-m", "mgt_scale.train.entry", "--config", str(path)]
    else:
        cmd = deepspeed_cmd(num_ranks, "--module", "mgt_scale.train.entry", "--config", str(path))
    proc = run_cmd(cmd, env=env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses, proc.stdout


def rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
