# The collective side of checkpoint verification: one decision, broadcast. Rank 0 chooses which
# checkpoint to resume (cheap checks: manifest, sizes) and broadcasts its step, so ranks that see the
# filesystem differently (an NFS attribute cache, a late manifest) still load one step; then every rank
# hashes only its own share of that checkpoint (ckpt_format.share_of: the files it wrote and reads
# back) and the problems are gathered, so a file is hashed once per resume, in parallel across ranks,
# instead of every rank hashing the whole checkpoint. `checkpoint.verify: full` keeps the old,
# paranoid check (every rank hashes every file). No process group: one rank, same answers.
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist

from mgt_scale.checkpoint.manifest import read_manifest, share_of, verify_checkpoint


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_obj(obj, src: int = 0):
    """`obj` of rank `src`, on every rank."""
    if _active():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def gather_obj(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if _active():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, obj)
        return every
    return [obj]


def first_problem(problem: Optional[str]) -> Optional[str]:
    """Collective: the first rank's problem, on every rank (so that all ranks raise, or none)."""
    return next((p for p in gather_obj(problem) if p), None)


def verify_shared(tag_dir: Path, rank: int, world_size: int, same_layout: Optional[bool] = None,
                  full: bool = False) -> list[str]:
    """Collective: the problems of checkpoint `tag_dir`, the same list on every rank. Every rank checks
    the sizes of all files (a stat each) and hashes its share (share_of); `full`: hashes every file.
    `same_layout` None: the manifest's world size decides (the writers are this world's ranks)."""
    problems: list[str]
    try:
        manifest = read_manifest(tag_dir)
    except (OSError, ValueError):
        manifest = None
    if manifest is None:
        problems = verify_checkpoint(tag_dir, full=False)  # names the missing / unreadable manifest
    else:
        if same_layout is None:
            same_layout = manifest.get("world_size") == world_size
        only = None if full else share_of(manifest, rank, world_size, bool(same_layout))
        problems = verify_checkpoint(tag_dir, full=True, only=only)
    seen, merged = set(), []
    for rank_problems in gather_obj(problems):
        for p in rank_problems:
            if p not in seen:
                seen.add(p)
                merged.append(p)
    return merged


def choose_step(candidates: list[int], cheap_problems, rank: int) -> tuple[Optional[int], dict]:
    """Collective: rank 0 walks `candidates` (newest first) and picks the first whose cheap check
    (`cheap_problems(step)` -> list) passes; the step (or None) and the problems of those it skipped
    are broadcast. Other ranks' `candidates` are ignored."""
    choice, skipped = None, {}
    if rank == 0:
        for step in candidates:
            problems = cheap_problems(step)
            if not problems:
                choice = step
                break
            skipped[step] = problems
    return broadcast_obj((choice, skipped))

