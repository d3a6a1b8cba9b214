# Retention rule and the damaged-checkpoint folder, for CheckpointManager (checkpoint.py), which does
# the listing, verification and `latest` pointer. Kept free of torch/DeepSpeed so the rule is testable
# on plain numbers. A checkpoint that fails verification is moved, untouched, to
# checkpoints/damaged/<time>-step_N/step_N/ with a reason.txt beside it: never resumed from, never
# counted by keep_last, never deleted by mgt-scale (an operator inspects and deletes it).
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

DAMAGED = "damaged"
REASON = "reason.txt"


def plan_retention(steps: list[int], complete: list[int], newest: int, keep_last: int, keep_every: int,
                   problems: Callable[[int], list[str]]) -> tuple[list[int], dict[int, list[str]]]:
    """(steps to delete, damaged steps with their problems) after the save of `newest`.

    Keeps the newest `keep_last` complete checkpoints that verify (`newest`, just written, always
    counts) and every `keep_every`-th complete one. Complete checkpoints are verified newest first
    only until `keep_last` good ones are found; one that fails is damaged: it counts neither towards
    keep_last nor as deleted (the caller moves it aside), so a good older one is never deleted for it.
    An interrupted save (no manifest) counts neither; below `newest` it is deleted, above it the next
    save of that step replaces it."""
    good, damaged = [], {}
    for s in sorted(complete, reverse=True):
        if len(good) >= keep_last:
            break
        bad = problems(s) if s != newest else []
        if bad:
            damaged[s] = bad
        else:
            good.append(s)
    keep = set(good) | {newest}
    if keep_every:
        keep |= {s for s in complete if s % keep_every == 0 and s not in damaged}
    done = set(complete)
    delete = [s for s in steps if s not in keep and s not in damaged and (s in done or s < newest)]
    return delete, damaged


def move_damaged(ckpt_dir: Path, tag: str, problems: list[str], src: Path | None = None) -> Path:
    """Move checkpoints/<tag> (or `src`, a copy of it kept aside) to checkpoints/damaged/<time>-<tag>/<tag>
    and write reason.txt there."""
    base = ckpt_dir / DAMAGED / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}"
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir(parents=True)
    os.replace(ckpt_dir / tag if src is None else src, dest / tag)
    (dest / REASON).write_text(
        f"{tag} failed verification on {time.strftime('%Y-%m-%d %H:%M:%S %z')} and was moved here by "
        "mgt-scale, so that `--resume auto` never picks it and retention (checkpoint.keep_last) never "
        "counts it:\n" + "".join(f"  {p}\n" for p in problems)
        + f"Check it again with `mgt ckpt verify {dest / tag}`; delete this folder when no longer needed.\n")
    return dest
