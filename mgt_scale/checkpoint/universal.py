# Resharding: a checkpoint saved with one world size converted to DeepSpeed's universal format
# (deepspeed.checkpoint.ds_to_universal) so that it loads on another. The conversion runs with several
# worker processes (checkpoint.reshard_workers; 0 = the CPUs of this node), either ahead of the job
# (`mgt ckpt reshard`) or at resume on rank 0 while the other ranks wait in a collective whose
# timeout the config sets (parallel.dist_timeout_minutes), never DeepSpeed's 10-minute default.
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mgt_scale.logs import get_logger
from mgt_scale.checkpoint.manifest import (MANIFEST, CheckpointError, sha256_file, universal_dir, verify_checkpoint,
                                         write_manifest)

_log = get_logger(__name__)



class ConversionError(CheckpointError):
    """DeepSpeed's converter failed on a checkpoint that verified: a fault of the tool or the machine
    (exit 1 of `mgt ckpt reshard`), unlike a damaged checkpoint (bad input, exit 2)."""

def reshard_workers(requested: int = 0) -> int:
    """Worker processes for ds_to_universal: `requested`, or (0) the CPUs this process may use, at most 32."""
    if requested > 0:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 32))


def make_universal(tag_dir: Path, log=_log.info, force: bool = False, workers: int = 0, verified: bool = False) -> Path:
    """Convert a verified sharded checkpoint with DeepSpeed's ds_to_universal (`workers` extract and
    merge processes). The output gets its own manifest, which records the sha256 of the source's
    manifest (itself a list of every file's sha256). An existing verified conversion is reused only if
    it was made from these very files: a step directory can be written again with other contents (a run
    resumed from an older checkpoint reaches that step anew), and the stale conversion would load the
    old weights. `verified`: the caller has just hashed the source (at resume every rank hashed its
    share, in parallel), so rank 0 does not hash all of it again, alone, while the other ranks wait."""
    tag_dir = Path(tag_dir)
    out = universal_dir(tag_dir)
    source = sha256_file(tag_dir / MANIFEST) if (tag_dir / MANIFEST).is_file() else None
    if not force and out.is_dir() and not verify_checkpoint(out):
        made_from = json.loads((out / MANIFEST).read_text()).get("source_manifest_sha256")
        if source is not None and made_from == source:
            return out
        log(f"{out}: converted from other contents of {tag_dir.name}: converting again")
    problems = verify_checkpoint(tag_dir, full=not verified)
    if problems:
        raise CheckpointError(f"{tag_dir}: cannot reshard a damaged checkpoint: " + "; ".join(problems))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    n = reshard_workers(workers)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", str(n), "--num_merge_workers", str(n),
           "--inject_missing_state"]  # pipeline x ZeRO-1 saves carry no universal_checkpoint_info
    log("converting: " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ConversionError(f"{tag_dir}: ds_to_universal failed (exit {r.returncode}):\n"
                              + (r.stdout[-2000:] + r.stderr[-2000:]))
    for f in tag_dir.glob("rng_rank*.pt"):
        shutil.copy2(f, tmp / f.name)
    (out.parent / "latest_universal").unlink(missing_ok=True)
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    write_manifest(tmp, {k: v for k, v in manifest.items() if k not in ("files", "written_at")}
                   | {"universal_of": tag_dir.name, "source_manifest_sha256": source})
    os.replace(tmp, out)
    return out
