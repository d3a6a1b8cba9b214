# Preemption: SIGTERM / SIGUSR1 (SLURM's pre-timeout signal), a kill-switch file and the wall-time
# budget all set one flag; at the next step boundary every rank agrees (all-reduce), a checkpoint is
# written and the run exits with exit_codes.PREEMPTED so the job is requeued and resumes.
from __future__ import annotations

import signal
import time
from pathlib import Path

_SIGNALLED: list[str] = []


def _handler(signum, frame) -> None:  # only sets a flag: all work happens at a step boundary
    _SIGNALLED.append(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    """Install early (before heavy imports) so a signal during start-up is not lost."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _handler)


def stop_requested(run_dir: str) -> bool:
    """A signal arrived or the kill-switch file exists (local check, for loops inside a step)."""
    return bool(_SIGNALLED) or (Path(run_dir) / "STOP").exists()


class StopConditions:
    """Why the run should stop now, if it should: a signal, the kill-switch file, or the wall-time
    budget (stop when the time left is below twice the slowest step plus the last save time)."""

    def __init__(self, run_dir: str, max_wall_time: float, start_time: float):
        self.kill_switch = Path(run_dir) / "STOP"
        self.max_wall_time, self.start = max_wall_time, start_time
        self.slowest_step = 0.0
        self.save_time = 0.0

    def local_reason(self, step_time: float) -> str:
        self.slowest_step = max(self.slowest_step, step_time)
        if _SIGNALLED:
            return f"signal {_SIGNALLED[0]}"
        if self.kill_switch.exists():
            return f"kill-switch file {self.kill_switch}"
        if self.max_wall_time:
            left = self.max_wall_time - (time.time() - self.start)
            if left < 2 * self.slowest_step + self.save_time:
                return f"wall-time budget train.max_wall_time={self.max_wall_time:g}s nearly spent"
        return ""
