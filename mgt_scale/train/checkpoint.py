# Checkpoint manager on DeepSpeed's sharded save_checkpoint: our client state (step, data position,
# RNG, monitor, config + hash, library versions) in every checkpoint, a manifest (files, sizes,
# sha256, world layout) written last, a `latest` pointer moved by atomic rename only after every rank
# has finished, retention (last K plus every M-th), and selection of the newest *good* checkpoint.
# DeepSpeed's own `latest` file is never written or read.
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from mgt_scale.config import Config, config_hash, to_dict

MANIFEST = "mgt_manifest.json"
LATEST = "latest_good"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def library_versions() -> dict:
    import deepspeed
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "numpy": np.__version__}


def write_manifest(tag_dir: Path, meta: dict) -> None:
    files = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = str(p.relative_to(tag_dir))
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    if not files:
        raise CheckpointError(f"{tag_dir}: no files were written")
    manifest = dict(meta, files=files, written_at=time.time())
    tmp = tag_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, tag_dir / MANIFEST)


def verify_checkpoint(tag_dir: Path, full: bool = True) -> list[str]:
    """Problems with a checkpoint directory (empty list = good). Names every bad file."""
    mpath = tag_dir / MANIFEST
    if not mpath.is_file():
        return [f"{mpath}: missing (checkpoint incomplete: a save was interrupted)"]
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{mpath}: unreadable ({e})"]
    problems = []
    for rel, info in manifest.get("files", {}).items():
        p = tag_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != info["size"]:
            problems.append(f"{p}: size {p.stat().st_size} != {info['size']} in the manifest")
        elif full and sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: sha256 mismatch (corrupted)")
    return problems


class CheckpointManager:
    def __init__(self, run_dir: str, cfg: Config, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.ckpt = cfg.checkpoint

    # -- listing ---------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir())

    def find_resume(self, log=print) -> Optional[Path]:
        """Newest checkpoint whose manifest verifies; damaged or incomplete newer ones are reported."""
        for step in reversed(self.steps()):
            tag_dir = self.dir / tag_for(step)
            problems = verify_checkpoint(tag_dir)
            if not problems:
                return tag_dir
            for p in problems:
                log(f"checkpoint {tag_dir.name} rejected: {p}")
        return None

    # -- saving ----------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a leftover from an interrupted save of the same step
                shutil.rmtree(tag_dir)
        _barrier()
        state = dict(client_state)
        state.update({"step": step, "rng": rng_state(), "config": to_dict(self.cfg),
                      "config_hash": config_hash(self.cfg), "versions": library_versions(),
                      "world_size": self.world_size})
        # per-rank RNG: DeepSpeed stores client_state from rank 0 only, so every rank keeps its own file
        engine.save(str(self.dir), tag, state)
        torch.save({"rng": rng_state()}, tag_dir / f"rng_rank{self.rank:05d}.pt")
        _barrier()  # every rank has finished writing its shards
        if self.rank == 0:
            write_manifest(tag_dir, {"step": step, "world_size": self.world_size, "mode": self.cfg.parallel.mode,
                                     "pipeline_stages": self.cfg.parallel.pipeline_stages,
                                     "config_hash": config_hash(self.cfg)})
            tmp = self.dir / f".{LATEST}.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.dir / LATEST)
            self._prune(step)
        _barrier()
        return tag_dir

    def _prune(self, newest: int) -> None:
        steps = self.steps()
        keep = set(steps[-self.ckpt.keep_last:]) | {newest}
        if self.ckpt.keep_every:
            keep |= {s for s in steps if s % self.ckpt.keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.dir / tag_for(s), ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------
    def load(self, engine, tag_dir: Path) -> dict:
        """Load model/optimizer into the engine and return our client state (RNG already restored)."""
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        if manifest["world_size"] != self.world_size or manifest["mode"] != self.cfg.parallel.mode:
            raise CheckpointError(
                f"{tag_dir}: saved with world size {manifest['world_size']} ({manifest['mode']}), resuming with "
                f"{self.world_size} ({self.cfg.parallel.mode}): reshard it first with `mgt ckpt reshard`")
        state = engine.load(str(tag_dir.parent), tag_dir.name)
        if state is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it")
        rank_file = tag_dir / f"rng_rank{self.rank:05d}.pt"
        rng = torch.load(rank_file, weights_only=False)["rng"] if rank_file.is_file() else state["rng"]
        set_rng_state(rng)
        return state
