# The record of a successful data verification, kept next to the run (<run.dir>/.data_verified.json),
# so that a restart (every requeue of a SLURM job, on every node) hashes only the shard files that
# changed since, instead of the whole data set again. Per source (absolute data path) it holds the
# sha256 of the manifest the shards were verified against and, per shard / index file, its size,
# mtime_ns and inode number when it was verified with the manifest's sha256. A file whose stat still
# matches is trusted without reading it.
#
# Limitation: size + mtime + inode trusts the filesystem. Bytes changed in place without a new mtime
# (a storage fault, `touch -d` back to the old time, a copy tool that restores mtimes over other
# contents) are not seen at a restart; the first start of a run, `checkpoint.verify: full` and
# `mgt prep --verify` hash everything. The inode makes node-local copies at the same path (other
# inodes on each node) count as changed: they are hashed on their node.
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

VERSION = 1
CACHE_NAME = ".data_verified.json"


def manifest_sha256(data_dir: str | Path) -> str | None:
    from .shards import MANIFEST
    try:
        return hashlib.sha256((Path(data_dir) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def file_sha256s(data_dir: str | Path) -> dict[str, str]:
    """The manifest's sha256 of each shard and index file (relative name)."""
    from .shards import load_manifest
    m = load_manifest(data_dir)
    out = {}
    for split in m["splits"].values():
        for s in split["shards"]:
            out[s["file"]] = s["sha256"]
            out[s["index"]] = s["index_sha256"]
    return out


def stat_key(path: Path) -> dict | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def load(cache: Path | None) -> dict:
    if cache is None:
        return {}
    try:
        data = json.loads(Path(cache).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("sources", {}) if isinstance(data, dict) and data.get("version") == VERSION else {}


def unchanged(cached: dict, data_dir: str, manifest_sha: str | None, stats: dict[str, dict | None],
              shas: dict[str, str]) -> set[str]:
    """The files of `data_dir` verified before with the same manifest and the same stat now."""
    entry = cached.get(str(Path(data_dir).absolute()))
    if not entry or manifest_sha is None or entry.get("manifest_sha256") != manifest_sha:
        return set()
    files = entry.get("files", {})
    return {f for f, st in stats.items()
            if st is not None and f in files and files[f] == dict(st, sha256=shas.get(f))}


def record(cache: Path, entries: dict[str, tuple[str | None, dict[str, dict | None], dict[str, str]]]) -> None:
    """Write the cache atomically (temporary file + rename): {data_dir: (manifest sha, stats taken
    before hashing, manifest sha256s)}. Sources verified before with another manifest are replaced."""
    sources = load(cache)
    for d, (msha, stats, shas) in entries.items():
        if msha is None:
            continue
        sources[str(Path(d).absolute())] = {
            "manifest_sha256": msha,
            "files": {f: dict(st, sha256=shas.get(f)) for f, st in sorted(stats.items()) if st is not None}}
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"version": VERSION, "sources": sources}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cache)
