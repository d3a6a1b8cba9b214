# The on-disk format of an mgt-scale checkpoint, free of process groups: tag names, the manifest
# (every file's size, sha256 and the rank that wrote it, written last), hashing, the checks of a
# checkpoint directory (sizes only, or contents), which rank checks which file at resume, the RNG and
# parameter-layout records each rank keeps, and the data tokenizer check. CheckpointManager
# (checkpoint.py) does the collective side; ckpt_collective.py the verification across ranks.
from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from mgt_scale.data.shards import fsync_dir, sha256_file

MANIFEST = "mgt_manifest.json"
LATEST = "latest_good"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def universal_dir(tag_dir: Path) -> Path:
    """Where the universal (world-size independent) form of a checkpoint lives."""
    tag_dir = Path(tag_dir)
    return tag_dir.parent / "universal" / tag_dir.name


def fsync_file(path: Path) -> None:
    """Flush `path` to stable storage: a manifest must never describe bytes that a node loss can still
    take back (page cache of a client-caching parallel filesystem or a local disk)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_durable(path: Path, text: str) -> None:
    """Write `text` to `path` by a synced temporary file, an atomic rename and a synced directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_record(path: Path, rank: Optional[int]) -> dict:
    """A manifest entry: size and sha256 of `path`, and the rank that wrote (and hashed) it. The file is
    synced first: the record says the bytes are there."""
    fsync_file(path)
    rec = {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}
    if rank is not None:
        rec["rank"] = int(rank)
    return rec


def rng_state() -> dict:
    """RNG states of python, numpy and torch as plain lists/ints/floats/tensors, so the file loads
    with `torch.load(..., weights_only=True)` (no pickled numpy objects). On GPUs, the CUDA state of
    this rank's device only: `get_rng_state_all` would create a context on every visible GPU from every
    rank, and its list could not be restored on a node with fewer GPUs (a resharded resume hands rank
    0's state to ranks that have no file of their own)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [int(version), [int(v) for v in internal], gauss],
             "numpy": [str(name), [int(v) for v in keys], int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # earlier versions kept one state per visible device
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def library_versions() -> dict:
    import deepspeed
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "numpy": np.__version__}


def rank_file(tag_dir: Path, rank: int) -> Path:
    """Our per-rank file in a checkpoint: that rank's RNG state and parameter layout."""
    return tag_dir / f"rng_rank{rank:05d}.pt"


def layout_problem(tag_dir: Path, saved: Optional[list], current: list) -> Optional[str]:
    """Why the parameters recorded in a checkpoint (`optim.param_layout`) are not the model's, or None.
    DeepSpeed checks none of this: ZeRO's flat partitions of the same total size load into renamed or
    reordered parameters without an error."""
    if saved is None:
        return (f"{tag_dir}: records no parameter layout: it was written by mgt-scale 0.1, whose residual "
                "operators kept one parameter per LayerNorm weight and bias, b_beta and alpha (0.2 packs them "
                "into `vectors`), so its flat optimizer state would load into the wrong parameters. Resume it "
                "with mgt-scale 0.1, or export its weights with `mgt export` (which reads both layouts)")
    if saved == current:
        return None
    # the first entry that differs, or where the shorter list ends
    i = next((i for i, (a, b) in enumerate(zip(saved, current)) if a != b), min(len(saved), len(current)))

    def entry(seq: list) -> str:
        return f"{seq[i][1]} {seq[i][2]} (group {seq[i][0]})" if i < len(seq) else "none"

    return (f"{tag_dir}: its parameters are not this model's ({len(saved)} tensors saved, {len(current)} in the "
            f"model); first difference at #{i}: checkpoint {entry(saved)}, model {entry(current)}. Resume "
            "with the model config and mgt-scale version that wrote it")


def read_manifest(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / MANIFEST).read_text())


def write_manifest(tag_dir: Path, meta: dict, hashed: Optional[dict] = None) -> None:
    """Write the manifest of `tag_dir` (last, by atomic rename). `hashed`: records ({rel: file_record})
    the writing ranks made of their own files; any other file found here is hashed now."""
    files = dict(hashed or {})  # a writer's own record wins: this rank's stat of another node's file can be stale (NFS)
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}"):
            rel = str(p.relative_to(tag_dir))
            if rel not in files:
                files[rel] = file_record(p, None)
    if not files:
        raise CheckpointError(f"{tag_dir}: no files were written")
    fsync_dir(tag_dir)
    manifest = dict(meta, files=dict(sorted(files.items())), written_at=time.time())
    write_durable(tag_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def _load_manifest(tag_dir: Path) -> tuple[Optional[dict], list[str]]:
    mpath = Path(tag_dir) / MANIFEST
    if not mpath.is_file():
        return None, [f"{mpath}: missing (checkpoint incomplete: a save was interrupted)"]
    try:
        return json.loads(mpath.read_text()), []
    except (OSError, json.JSONDecodeError) as e:
        return None, [f"{mpath}: unreadable ({e})"]


def verify_checkpoint(tag_dir: Path, full: bool = True, only: Optional[Iterable[str]] = None) -> list[str]:
    """Problems with a checkpoint directory (empty list = good). Names every bad file. `full`: also the
    sha256 of each file (else sizes only); `only`: hash just these files (relative names; the others
    get the size check), as each rank does for its own share at resume (ckpt_collective)."""
    manifest, problems = _load_manifest(tag_dir)
    if manifest is None:
        return problems
    only = None if only is None else set(only)
    for rel, info in manifest.get("files", {}).items():
        p = Path(tag_dir) / rel
        try:  # a read error is this file's problem, not an exception: every rank must reach the gather
            if not p.is_file():
                problems.append(f"{p}: missing")
            elif p.stat().st_size != info["size"]:
                problems.append(f"{p}: size {p.stat().st_size} != {info['size']} in the manifest")
            elif full and (only is None or rel in only) and sha256_file(p) != info["sha256"]:
                problems.append(f"{p}: sha256 mismatch (corrupted)")
        except OSError as e:
            problems.append(f"{p}: unreadable ({e.strerror or e})")
    return problems


def share_of(manifest: dict, rank: int, world_size: int, same_layout: bool) -> list[str]:
    """The files of a checkpoint whose contents `rank` checks at resume, so that each file is hashed
    once, in parallel across ranks. Under the same layout, the files it wrote itself (the ones it reads
    back: its ZeRO partition, its RNG file; the manifest names the writer) and, on rank 0, files no
    rank claimed; otherwise (another world size, or a manifest without writers) a round-robin share."""
    files = sorted(manifest.get("files", {}))
    writers = {rel: manifest["files"][rel].get("rank") for rel in files}
    if same_layout and any(w is not None for w in writers.values()):
        return [rel for rel in files if (writers[rel] if writers[rel] is not None
                                         and writers[rel] < world_size else 0) == rank]
    return [rel for i, rel in enumerate(files) if i % max(world_size, 1) == rank]


def data_tokenizer_problem(tag_dir: Path, current: dict) -> tuple[Optional[str], Optional[str]]:
    """(error, warning) of resuming `tag_dir` on data whose tokenizer identity is `current`
    (mgt_scale.data.data_tokenizer_identity). Another tokenizer's ids name other pieces: the weights
    would train on what is noise to them (the loss jumps back up) without any error. A checkpoint
    written before identities were recorded gives a warning only. Reads the checkpoint's manifest, so
    every rank comes to the same answer without loading anything."""
    from mgt_scale.data.shards import describe_tokenizer, same_tokenizer
    tag_dir = Path(tag_dir)
    try:
        saved = json.loads((tag_dir / MANIFEST).read_text()).get("data_tokenizer")
    except (OSError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        return None, (f"{tag_dir}: records no data tokenizer identity (written by an older mgt-scale): cannot "
                      f"check that it was trained on data with the current {describe_tokenizer(current)}")
    if same_tokenizer(saved, current):
        return None, None
    return (f"{tag_dir}: trained on data with {describe_tokenizer(saved)}, but the configured data has "
            f"{describe_tokenizer(current)}: its token ids name other pieces, so resuming would train the weights "
            "on garbage. Resume with the data it was trained on (point data.path or data.blend at it again), "
            "or start a new run (another run.dir, without --resume)"), None
