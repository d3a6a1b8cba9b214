# Stand-in for launch/pretrain.py in the SLURM tests: same command line (--config, --set, --resume,
# --dry-run) and the same exit-code contract (mgt_scale.exit_codes), without a model. Every rank derives
# its place with mgt_scale.cluster.dist_env, joins a real gloo process group, and runs `train.max_steps`
# steps of a deterministic recurrence that needs all ranks (an all_reduce per step), appending one line
# per step to <run.dir>/fake/rank<R>.txt. USR1/TERM: all ranks agree at the next step, checkpoint
# atomically and exit 85. --resume auto continues from the checkpoint. Behaviour switches live in
# <run.dir>/fake_trainer.json: step_seconds (resume_step_seconds after a resume), collapse_at (exit 86),
# crash_at (rank 0 exits 1), ckpt_every.
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

STOP = {"sig": None}


def _on_signal(signum, frame):  # noqa: ARG001 - the handler only records; the loop acts at a step boundary
    STOP["sig"] = signum


# install before the slow imports: a signal that comes while torch loads must not kill the rank
signal.signal(signal.SIGUSR1, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mgt_scale import exit_codes  # noqa: E402
from mgt_scale.cluster.dist_env import apply, derive_dist_env, describe  # noqa: E402
from mgt_scale.config import load_config  # noqa: E402


def _atomic_write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--resume", default="auto")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except Exception as e:  # ConfigError: the contract says exit 2
        print(f"config error: {e}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    if args.dry_run:
        print(cfg)
        return exit_codes.FINISHED

    run = Path(cfg.run.dir)
    control = json.loads((run / "fake_trainer.json").read_text()) if (run / "fake_trainer.json").exists() else {}
    d = derive_dist_env()
    apply(d)
    out = run / "fake"
    out.mkdir(parents=True, exist_ok=True)
    if d.rank == 0:
        print(describe(d), flush=True)
    dist.init_process_group("gloo", init_method="env://")
    assert dist.get_rank() == d.rank and dist.get_world_size() == d.world_size

    ckpt_dir = out if args.resume == "auto" else Path(args.resume)
    ckpt = ckpt_dir / f"ckpt.rank{d.rank}.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "x": 1}
    with open(out / "starts.txt", "a") as fh:
        fh.write(f"rank={d.rank} restart={os.environ.get('SLURM_RESTART_COUNT', '0')} "
                 f"job={os.environ.get('SLURM_JOB_ID', '-')} from_step={state['step']}\n")

    def save():
        _atomic_write(ckpt, state)

    records = open(out / f"rank{d.rank}.txt", "a")
    step_seconds = float(control.get("step_seconds", 0.05))
    if state["step"] > 0 and "resume_step_seconds" in control:
        step_seconds = float(control["resume_step_seconds"])
    ckpt_every = int(control.get("ckpt_every", 0))
    while state["step"] < cfg.train.max_steps:
        # one collective per step: the step's value and whether any rank has been asked to stop
        t = torch.tensor([float(d.rank + state["step"]), 1.0 if STOP["sig"] else 0.0], dtype=torch.float64)
        dist.all_reduce(t)
        if t[1] > 0:
            save()
            dist.barrier()  # the checkpoint is complete on every rank before any rank exits
            if d.rank == 0:
                print(f"stop signal: checkpoint at step {state['step']}, exit 85", flush=True)
            return exit_codes.PREEMPTED
        step = state["step"] + 1
        if control.get("crash_at") == step and d.rank == 0:
            print(f"crash at step {step}", flush=True)
            os._exit(1)
        state = {"step": step, "x": (state["x"] * 31 + int(t[0])) % 1_000_003}
        records.write(f"step={step} rank={d.rank} world={d.world_size} local_rank={d.local_rank} "
                      f"launcher={d.launcher} x={state['x']}\n")
        records.flush()
        if control.get("collapse_at") == step:
            save()
            dist.barrier()
            if d.rank == 0:
                print(f"collapse alarm at step {step}: exit 86", flush=True)
            return exit_codes.COLLAPSE
        if ckpt_every and step % ckpt_every == 0:
            save()
        time.sleep(step_seconds)
    save()
    dist.barrier()
    if d.rank == 0:
        print(f"finished {state['step']} steps", flush=True)
    return exit_codes.FINISHED


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
