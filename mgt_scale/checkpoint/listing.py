# The status of a run's checkpoints, read from their files alone (no process group, no run): what
# `mgt ckpt list` prints. "good": every file matches the manifest; "incomplete": no manifest (a save cut
# short); "damaged": a manifest, but files missing or differing from it.
from __future__ import annotations

import json
from pathlib import Path

from mgt_scale.checkpoint.manifest import LATEST, MANIFEST, TAG_RE, universal_dir, verify_checkpoint


def checkpoint_status(tag_dir: Path, full: bool = True) -> tuple[str, list[str], dict]:
    """("good" | "incomplete" | "damaged", problems, manifest or {})."""
    problems = verify_checkpoint(tag_dir, full=full)
    manifest = {}
    try:
        manifest = json.loads((Path(tag_dir) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        pass
    if not problems:
        return "good", [], manifest
    return ("incomplete" if not manifest else "damaged"), problems, manifest


def list_checkpoints(run_dir: str | Path, full: bool = True) -> list[dict]:
    """Every step_* checkpoint of a run (or of a checkpoints/ directory) with its status."""
    d = Path(run_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    latest = (d / LATEST).read_text().strip() if (d / LATEST).is_file() else None
    out = []
    if not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        m = TAG_RE.match(p.name)
        if not (m and p.is_dir()):
            continue
        status, problems, manifest = checkpoint_status(p, full=full)
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        out.append({"tag": p.name, "step": int(m.group(1)), "path": str(p), "status": status,
                    "problems": problems, "world_size": manifest.get("world_size"), "mode": manifest.get("mode"),
                    "bytes": size, "latest": p.name == latest, "universal": universal_dir(p).is_dir()})
    return out
