# The record of a successful data verification, kept next to the run (<run.dir>/.data_verified.json),
# so that a restart (every requeue of a SLURM job, on every node) hashes only the shard files that
# changed since, instead of the whole data set again. Per host (socket.gethostname() of the node that
# verified) and per source (absolute data path) it holds the sha256 of the manifest the shards were
# verified against and, per shard / index file, its size, mtime_ns, device and inode number when it was
# verified with the manifest's sha256. A file whose stat still matches the record of its own host is
# trusted without reading it. Each node's files are recorded from that node's own stat (loader.py
# gathers them to the writer): a node never trusts what another node saw, so a node-local copy (same
# size, an mtime kept by `rsync -a`, even the same inode numbers on an identically formatted disk) is
# hashed on each node it was first verified on.
#
# Limitation: size + mtime + device + inode trusts the filesystem. Bytes changed in place without a new
# mtime (a storage fault, `touch -d` back to the old time, a copy tool that restores mtimes over other
# contents) are not seen at a restart; the first start of a run on a node, `checkpoint.verify: full`
# and `mgt prep --verify` hash everything.
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

VERSION = 2  # 1: one record for every node (the stats of global rank 0's node)
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
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "dev": st.st_dev, "ino": st.st_ino}


def host() -> str:
    """The name this node's records are kept under."""
    return socket.gethostname()


def _load_hosts(cache: Path) -> dict:
    try:
        data = json.loads(Path(cache).read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("hosts"), dict)
    return data["hosts"] if ok else {}


def load(cache: Path | None, host_name: str | None = None) -> dict:
    """The sources recorded as verified on `host_name` (default: this host) only."""
    if cache is None:
        return {}
    entry = _load_hosts(cache).get(host() if host_name is None else host_name, {})
    return entry if isinstance(entry, dict) else {}


def unchanged(cached: dict, data_dir: str, manifest_sha: str | None, stats: dict[str, dict | None],
              shas: dict[str, str]) -> set[str]:
    """The files of `data_dir` verified before with the same manifest and the same stat now."""
    entry = cached.get(str(Path(data_dir).absolute()))
    if not entry or manifest_sha is None or entry.get("manifest_sha256") != manifest_sha:
        return set()
    files = entry.get("files", {})
    return {f for f, st in stats.items()
            if st is not None and f in files and files[f] == dict(st, sha256=shas.get(f))}


def record(cache: Path, by_host: dict[str, dict[str, tuple[str | None, dict[str, dict | None], dict[str, str]]]]) -> None:
    """Write the cache atomically (temporary file + rename): {host: {data_dir: (manifest sha, stats taken
    on that host before hashing, manifest sha256s)}}. A host's sources verified before with another
    manifest are replaced; the records of hosts not in `by_host` are kept (a later job may run there)."""
    hosts = _load_hosts(cache)
    for h, entries in by_host.items():
        sources = hosts.get(h) if isinstance(hosts.get(h), dict) else {}
        for d, (msha, stats, shas) in entries.items():
            if msha is None:
                continue
            sources[str(Path(d).absolute())] = {
                "manifest_sha256": msha,
                "files": {f: dict(st, sha256=shas.get(f)) for f, st in sorted(stats.items()) if st is not None}}
        hosts[h] = sources
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"version": VERSION, "hosts": hosts}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cache)
