# Data shards are hashed once per node at start (loader.verify_data_once: the shard files dealt out to
# the node's ranks by size), not by every rank each time it opens them: before, a start hashed the
# whole data set three times per rank (train loader, validation batches, monitor probe).
import hashlib
from pathlib import Path

import numpy as np
import pytest

from mgt_scale.config import load_config


def make_data(out: Path) -> Path:
    from mgt_scale.data import shards
    out.mkdir(parents=True)
    (out / shards.TOKENIZER_FILE).write_bytes(b"t" * 1024)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 1 << 16), ("valid", 1 << 13)):
        w = shards.SplitWriter(out, split, np.dtype(np.uint16), shard_tokens=n // 4)
        toks = rng.integers(1, 500, size=n, dtype=np.uint16)
        lengths = np.full(n // 256, 256)
        toks[np.cumsum(lengths) - 1] = 0
        w.add(toks, lengths)
        splits[split] = w.finish()
    shards.write_manifest(out, {"format": shards.FORMAT_NAME, "format_version": shards.FORMAT_VERSION,
                                "vocab_size": 512, "dtype": "uint16", "eos_id": 0,
                                "tokenizer": {"file": shards.TOKENIZER_FILE,
                                              "sha256": shards.sha256_file(out / shards.TOKENIZER_FILE)},
                                "splits": splits})
    return out


@pytest.fixture
def hashed(monkeypatch):
    real, count = hashlib.sha256, [0]

    class Counting:
        def __init__(self, *a):
            self._h = real(*a)

        def update(self, b):
            count[0] += len(b)
            self._h.update(b)

        def hexdigest(self):
            return self._h.hexdigest()
    monkeypatch.setattr(hashlib, "sha256", Counting)
    from mgt_scale.data import shards
    monkeypatch.setattr(shards, "_VERIFIED", {})
    return count


def data_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.suffix in (".bin", ".npy"))


def test_a_start_hashes_the_data_once_and_later_opens_check_sizes_only(tmp_path, hashed, monkeypatch):
    from mgt_scale.data import build_train_loader, build_valid_batches, verify_data_once
    d = make_data(tmp_path / "data")
    hashed[0] = 0  # writing the shards hashed them too
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config(None, [f"data.path={d}", "data.seq_len=16", "model.vocab_size=512"])
    verify_data_once(cfg.data)
    assert hashed[0] >= data_bytes(d)
    hashed[0] = 0
    loader = build_train_loader(cfg.data, seq_len=16, global_batch=4, micro_batch=2, dp_rank=0, dp_size=1,
                                vocab_size=512, prefetch=0)
    build_valid_batches(cfg.data, 16, 2, 2, 512)
    build_valid_batches(cfg.data, 16, 2, 1, 512)  # the monitor probe
    loader.close()
    assert hashed[0] < 4 * 1024  # the tokenizer file at most: before, the whole data set per open


@pytest.mark.parametrize("local_rank", [0, 1])
def test_the_ranks_of_a_node_share_the_hashing_and_a_damaged_shard_is_found(tmp_path, hashed, monkeypatch, local_rank):
    from mgt_scale.data import DataError, verify_data_once
    d = make_data(tmp_path / "data")
    hashed[0] = 0  # writing the shards hashed them too
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = load_config(None, [f"data.path={d}"])
    verify_data_once(cfg.data)
    total = data_bytes(d)
    assert 0.3 * total < hashed[0] < 0.7 * total + 4096  # about half each
    from mgt_scale.data import shards
    monkeypatch.setattr(shards, "_VERIFIED", {})
    for f in sorted(d.glob("*.bin")):  # damage every shard: each rank finds those of its share
        data = bytearray(f.read_bytes())
        data[10] ^= 1
        f.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 checksum mismatch"):
        verify_data_once(cfg.data)


def test_a_read_error_on_one_rank_still_reaches_the_gather(tmp_path, monkeypatch):
    """A rank whose read fails (EIO, ESTALE on one node) must join the problems' all_gather like the
    others, or they wait there until the collective times out; the error then names the data."""
    import errno

    import torch.distributed as dist

    from mgt_scale.data import DataError, shards, verify_data_once
    d = make_data(tmp_path / "data")
    monkeypatch.setattr(shards, "_VERIFIED", {})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def unreadable(path, chunk=1 << 22):
        raise OSError(errno.EIO, "Input/output error", str(path))
    monkeypatch.setattr(shards, "sha256_file", unreadable)
    gathered = []

    def all_gather_object(out, obj):  # a 2-rank world whose other rank found nothing
        gathered.append(obj)
        out[:] = [obj, []]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    cfg = load_config(None, [f"data.path={d}"])
    with pytest.raises(DataError, match="Input/output error"):
        verify_data_once(cfg.data)
    assert len(gathered) == 1 and gathered[0], "the failing rank never reached the gather"


# -- restarts: <run.dir>/.data_verified.json (data/verify_cache.py) -------------------------------
@pytest.fixture
def hashed_files(monkeypatch):
    """The shard / index files hashed (paths), by every sha256 of the data code."""
    from mgt_scale.data import shards
    real, seen = shards.sha256_file, []

    def counting(path, chunk=1 << 22):
        if Path(path).suffix in (".bin", ".npy"):
            seen.append(Path(path).name)
        return real(path, chunk)
    monkeypatch.setattr(shards, "sha256_file", counting)
    monkeypatch.setattr(shards, "_VERIFIED", {})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return seen


def start(cfg, cache, seen):
    """One start of a job: a new process (nothing verified in it yet)."""
    from mgt_scale.data import shards, verify_data_once
    shards._VERIFIED.clear()
    seen.clear()
    return verify_data_once(cfg.data, cache=cache)


def test_a_restart_hashes_only_the_shards_that_changed(tmp_path, hashed_files):
    import os
    d = make_data(tmp_path / "data")
    cfg = load_config(None, [f"data.path={d}"])
    cache = tmp_path / "run" / ".data_verified.json"
    every = sorted(f.name for f in d.iterdir() if f.suffix in (".bin", ".npy"))
    first = start(cfg, cache, hashed_files)
    assert sorted(hashed_files) == every and first["hashed_bytes"] == data_bytes(d)
    assert cache.is_file()
    second = start(cfg, cache, hashed_files)
    assert hashed_files == [] and second["hashed_bytes"] == 0  # before: the whole data set, every start
    shard = sorted(d.glob("train-*.bin"))[1]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: hashed again
    start(cfg, cache, hashed_files)
    assert hashed_files == [shard.name]
    start(cfg, cache, hashed_files)
    assert hashed_files == []


def test_a_changed_shard_is_found_and_nothing_is_recorded(tmp_path, hashed_files):
    from mgt_scale.data import DataError
    d = make_data(tmp_path / "data")
    cfg = load_config(None, [f"data.path={d}"])
    cache = tmp_path / "run" / ".data_verified.json"
    start(cfg, cache, hashed_files)
    shard = sorted(d.glob("train-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))  # a new mtime
    before = cache.read_text()
    with pytest.raises(DataError, match="sha256 checksum mismatch"):
        start(cfg, cache, hashed_files)
    assert cache.read_text() == before


def test_bytes_changed_under_the_same_size_and_mtime_are_trusted_unless_verifying_in_full(tmp_path, hashed_files):
    """The limitation, stated: size + mtime + inode trusts the filesystem. checkpoint.verify=full
    (the trainer passes no cache) and `mgt prep --verify` hash everything."""
    import os

    from mgt_scale.data import DataError, verify_output
    d = make_data(tmp_path / "data")
    cfg = load_config(None, [f"data.path={d}"])
    cache = tmp_path / "run" / ".data_verified.json"
    start(cfg, cache, hashed_files)
    shard = sorted(d.glob("train-*.bin"))[0]
    st = shard.stat()
    with open(shard, "r+b") as f:  # in place: same inode, same size
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 1]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    start(cfg, cache, hashed_files)  # not seen
    with pytest.raises(DataError, match="sha256 checksum mismatch"):
        start(cfg, None, hashed_files)
    from mgt_scale.data import shards
    shards._VERIFIED.clear()
    with pytest.raises(DataError, match="sha256 checksum mismatch"):
        verify_output(d, full=True)


def test_another_manifest_is_verified_in_full(tmp_path, hashed_files):
    import json
    d = make_data(tmp_path / "data")
    cfg = load_config(None, [f"data.path={d}"])
    cache = tmp_path / "run" / ".data_verified.json"
    start(cfg, cache, hashed_files)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(m, indent=1))  # same content, other bytes
    start(cfg, cache, hashed_files)
    assert sorted(hashed_files) == sorted(f.name for f in d.iterdir() if f.suffix in (".bin", ".npy"))


def test_a_record_made_on_one_host_is_not_trusted_on_another(tmp_path, hashed_files, monkeypatch):
    """A node-local copy on host B (same path, size, mtime, even inode) is hashed on B even though
    host A verified its own copy: each node trusts only what was recorded on that node."""
    import socket
    d = make_data(tmp_path / "data")
    cfg = load_config(None, [f"data.path={d}"])
    cache = tmp_path / "run" / ".data_verified.json"
    every = sorted(f.name for f in d.iterdir() if f.suffix in (".bin", ".npy"))
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    start(cfg, cache, hashed_files)
    start(cfg, cache, hashed_files)
    assert hashed_files == []  # host A: trusted
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    start(cfg, cache, hashed_files)
    assert sorted(hashed_files) == every  # before: trusted from node A's record
    start(cfg, cache, hashed_files)
    assert hashed_files == []
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    start(cfg, cache, hashed_files)
    assert hashed_files == []  # A's record kept when B's was added


def test_every_node_records_its_own_stats(tmp_path, hashed_files, monkeypatch):
    """In a multi-node world the writer (global rank 0) records each node's stats, contributed by that
    node's local rank 0, under that node's host name; a device number that differs is not trusted."""
    import json
    import socket

    import torch.distributed as dist

    from mgt_scale.data import verify_cache
    d = make_data(tmp_path / "data")
    cfg = load_config(None, [f"data.path={d}"])
    cache = tmp_path / "run" / ".data_verified.json"
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    shard = sorted(d.glob("train-*.bin"))[0].name
    other = {f: dict(st, dev=st["dev"] + 1) for f, st in
             {f: verify_cache.stat_key(d / f) for f in [shard]}.items()}

    def all_gather_object(out, obj):  # rank 1: local rank 0 of node-b, with its own stats
        if isinstance(obj, list):
            out[:] = [obj, []]
        else:
            out[:] = [obj, ("node-b", {str(d): (obj[1][str(d)][0], other, obj[1][str(d)][2])})]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    start(cfg, cache, hashed_files)
    hosts = json.loads(cache.read_text())["hosts"]
    assert sorted(hosts) == ["node-a", "node-b"]
    assert list(hosts["node-b"][str(d.absolute())]["files"]) == [shard]
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    start(cfg, cache, hashed_files)
    assert shard in hashed_files  # node-b's record names another device: hashed
