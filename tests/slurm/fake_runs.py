# Helpers for the SLURM tests: make a run dir for the stand-in trainer (tests/slurm/fake_trainer.py),
# render its job script with `mgt slurm render`, and read back its job log and per-step records.
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from mgt_scale.cluster import slurm as slurm_cli

FAKE_TRAINER = Path(__file__).resolve().parent / "fake_trainer.py"


class RunFactory:
    """Makes run dirs with a config for the stand-in trainer and renders their job scripts."""

    def __init__(self, base: Path):
        self.base = base

    def __call__(self, name: str, max_steps: int = 30, control: dict | None = None, run_dir: Path | None = None,
                 tasks: int = 2, time: str = "00:10:00", extra: list[str] = ()) -> tuple[Path, Path]:
        """Returns (run_dir, script). `control` goes to <run_dir>/fake_trainer.json."""
        run_dir = run_dir or self.base / name
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = run_dir / "cfg.yaml"
        cfg.write_text(json.dumps({"run": {"dir": str(run_dir), "name": name}, "data": {"synthetic": "copy"},
                                   "train": {"max_steps": max_steps, "warmup_steps": 0}}))
        (run_dir / "fake_trainer.json").write_text(json.dumps(control or {}))
        script = run_dir / "job.sbatch"
        argv = ["render", "--config", str(cfg), "--nodes", "1", "--tasks-per-node", str(tasks), "--time", time,
                "--signal-seconds", "30", "--entry", str(FAKE_TRAINER), "--python", sys.executable,
                "--workdir", str(run_dir), "--output", str(script), *extra]
        assert slurm_cli.main(argv) == 0
        return run_dir, script


def rank_exits(log: str, code: int) -> bool:
    """The job script logged a step that ended with `code` on the ranks. Once one rank has exited,
    srun --kill-on-bad-exit TERMs the other; one that is still tearing down its interpreter (slow under
    load) then dies of it (143): the script reads both, so [code code] and [code 143] both count."""
    m = re.search(r"per-rank exits \[(\d+) (\d+)\] -> (\d+)", log)
    if not m:
        return False
    exits = {int(m.group(1)), int(m.group(2))}
    return int(m.group(3)) == code and code in exits and exits <= {code, 143}


def read_log(run_dir: Path, job_id: int) -> str:
    logs = list((run_dir / "slurm").glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no job log)"


def records(run_dir: Path, rank: int) -> list[str]:
    path = run_dir / "fake" / f"rank{rank}.txt"
    return path.read_text().splitlines() if path.exists() else []


def starts(run_dir: Path) -> list[str]:
    path = run_dir / "fake" / "starts.txt"
    return path.read_text().splitlines() if path.exists() else []


def expected_records(max_steps: int, world: int, rank: int, launcher: str = "srun") -> list[str]:
    """The per-step lines an uninterrupted fake_trainer run writes (its recurrence, recomputed)."""
    x, lines = 1, []
    for step in range(1, max_steps + 1):
        total = world * (step - 1) + world * (world - 1) // 2  # all_reduce of (rank + step - 1)
        x = (x * 31 + total) % 1_000_003
        lines.append(f"step={step} rank={rank} world={world} local_rank={rank} launcher={launcher} x={x}")
    return lines
