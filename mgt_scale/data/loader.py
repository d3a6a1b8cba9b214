# The resumable, rank-aware training loader the trainer calls (build_train_loader), the fixed
# validation batches (build_valid_batches) and dataset_vocab_size. Samples are seq_len + 1 tokens cut
# contiguously from a split's token stream; their order comes from mgt_scale.data.sampler.
from __future__ import annotations

import os
import queue
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from .sampler import GlobalSampler, rank_slice
from .shards import MANIFEST, DataError, ShardSet, SplitTokens, load_manifest, tokenizer_identity
from .synthetic import STREAM_TRAIN, STREAM_VALID, CopyTaskSource, RandomTokenSource

Batch = tuple[torch.Tensor, torch.Tensor]


class ShardSampleSource:
    """Samples of one split: sample i = tokens[i*L : i*L + L + 1] of the concatenated stream (the
    last token of a sample is the first of the next; samples may span shard and document bounds).
    `wrap`: a split shorter than L + 1 tokens still yields one sample, its tokens repeated
    (only used for tiny validation splits)."""

    def __init__(self, tokens: SplitTokens, seq_len: int, name: str, wrap: bool = False):
        self.tokens, self.seq_len, self.name = tokens, seq_len, name
        total = tokens.num_tokens
        n = (total - 1) // seq_len if total > seq_len else 0
        if n == 0:
            if not wrap:
                raise DataError(f"{name}: {total} tokens are too few for one sample of seq_len + 1 = {seq_len + 1}")
            self._tiled = np.resize(tokens.read(0, total), seq_len + 1).astype(np.int64)
            n = 1
        else:
            self._tiled = None
        self.num_samples = n

    def get(self, indices: np.ndarray) -> np.ndarray:
        L = self.seq_len
        out = np.empty((len(indices), L + 1), dtype=np.int64)
        for row, i in enumerate(np.asarray(indices).tolist()):
            if self._tiled is not None:
                out[row] = self._tiled
            else:
                out[row] = self.tokens.read(i * L, i * L + L + 1)
        return out


# ----------------------------------------------------------------------------------------------
# Opening shard directories from a DataConfig


def _shard_dirs(data_cfg) -> list[tuple[str, float]]:
    if data_cfg.path and data_cfg.blend:
        raise DataError("data.path and data.blend are both set: use data.blend alone (list the path there "
                        "with its weight) or data.path alone")
    if data_cfg.blend:
        return [(b.path, b.weight) for b in data_cfg.blend]
    if data_cfg.path:
        return [(data_cfg.path, 1.0)]
    raise DataError("no training data: set data.path (a `mgt prep` output), data.blend or data.synthetic")


def _open_sets(data_cfg, vocab_size: int | None) -> list[tuple[ShardSet, float]]:
    full = bool(getattr(data_cfg, "verify_checksums", True))
    sets = [(ShardSet(p, full_checksums=full), w) for p, w in _shard_dirs(data_cfg)]
    first = sets[0][0]
    for s, _ in sets[1:]:
        if s.tokenizer_sha256 != first.tokenizer_sha256:
            raise DataError(f"{s.manifest_path}: blended with {first.manifest_path}, but written with another "
                            "tokenizer (tokenizer sha256 differs); prep all sources with the same --tokenizer")
    if vocab_size is not None:
        for s, _ in sets:
            if s.vocab_size > vocab_size:
                raise DataError(f"{s.manifest_path}: data vocab_size {s.vocab_size} exceeds the model's "
                                f"vocab_size {vocab_size}; set model.vocab_size >= {s.vocab_size}")
    return sets


def verify_data_once(data_cfg, cache: str | Path | None = None) -> dict:
    """Collective (every rank calls it, after the process group exists): the sha256 check of every
    shard (data.verify_checksums), done once per node in parallel, instead of by every rank each time it
    opens the data (train loader, validation batches, monitor probe). The shard files of all sources are
    dealt out to the ranks of this node (LOCAL_RANK of LOCAL_WORLD_SIZE: node-local copies are covered
    too), the problems gathered over the world, and every rank raises the same DataError if any. Later
    opens in this process then check sizes and counts only (shards.is_verified).
    `cache` (<run.dir>/.data_verified.json, verify_cache.py): files recorded there as verified, with
    the same manifest, size, mtime, device and inode on this same host, are not hashed again (a restart
    hashes what changed only); each node's local rank 0 contributes its node's stats, global rank 0
    records them all, per host. Returns {"hashed_bytes": this rank's, "trusted": files}."""
    import torch.distributed as dist

    from mgt_scale.data import verify_cache
    from mgt_scale.data.shards import check_output, mark_verified, shard_files
    if data_cfg.synthetic != "none" or not bool(getattr(data_cfg, "verify_checksums", True)):
        return {"hashed_bytes": 0, "trusted": 0}
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    dirs = [p for p, _ in _shard_dirs(data_cfg)]
    cached, seen = verify_cache.load(cache), {}
    for d in dirs:  # stat before hashing: a file changed meanwhile is hashed again at the next start
        files = shard_files(d)
        msha = verify_cache.manifest_sha256(d) if cache is not None else None
        shas = verify_cache.file_sha256s(d) if cache is not None else {}
        seen[d] = (msha, {f: verify_cache.stat_key(Path(d) / f) for f in files}, shas)
    trusted = {d: verify_cache.unchanged(cached, d, *seen[d]) for d in dirs}
    # largest first, each to the least loaded rank of the node: about equal bytes per rank
    work = sorted(((os.path.getsize(Path(d) / f) if (Path(d) / f).is_file() else 0, d, f)
                   for d in dirs for f in seen[d][1] if f not in trusted[d]), key=lambda w: (-w[0], w[1], w[2]))
    load, mine = [0] * local_world, []
    for size, d, f in work:
        r = min(range(local_world), key=lambda i: (load[i], i))
        load[r] += size
        if r == local_rank:
            mine.append((d, f))
    problems = []
    for d in dirs:
        try:  # a read error must not leave this rank out of the gather below (the others would wait)
            problems += check_output(d, full=True, only={f for dd, f in mine if dd == d})
        except OSError as e:
            problems.append(f"{d}: unreadable ({e})")
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if multi:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, problems)
        problems = list(dict.fromkeys(p for rank_problems in every for p in rank_problems))
    if problems:
        raise DataError("; ".join(problems))
    for d in dirs:
        mark_verified(d)
    if cache is not None:
        nodes = {verify_cache.host(): seen}
        if multi:  # every node's own stats, from its local rank 0, to the writer
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, (verify_cache.host(), seen) if local_rank == 0 else None)
            nodes = dict(e for e in every if e is not None)
    if cache is not None and (not multi or dist.get_rank() == 0):
        try:
            verify_cache.record(Path(cache), nodes)
        except OSError as e:  # the next start hashes everything again: slower, not wrong
            from mgt_scale.logs import get_logger
            get_logger(__name__).warning("could not record the data verification in %s (%s): the next start "
                                         "hashes every shard again", cache, e)
    n_trusted = sum(len(t) for t in trusted.values())
    if cache is not None:
        from mgt_scale.logs import get_logger
        get_logger(__name__).info("data verified: %d file(s) hashed on this node, %d unchanged since their last "
                                  "verification (%s) trusted by size, mtime and inode", len(work), n_trusted, cache)
    return {"hashed_bytes": load[local_rank] if local_rank < local_world else 0, "trusted": n_trusted}


def dataset_vocab_size(data_cfg) -> int | None:
    """Vocabulary size the data needs (largest over blended manifests); None for synthetic data."""
    if data_cfg.synthetic != "none":
        return None
    return max(int(load_manifest(p)["vocab_size"]) for p, _ in _shard_dirs(data_cfg))


def data_tokenizer_identity(data_cfg, model_vocab: int) -> dict:
    """The identity of the token space the configured data uses (shards.tokenizer_identity of its
    manifest; blended sources must share one tokenizer, which the loader enforces). Synthetic data has
    no tokenizer: its ids are generated over the model's vocabulary, so that size is its identity."""
    if data_cfg.synthetic != "none":
        return {"tokenizer_sha256": None, "vocab_size": int(model_vocab),
                "source": f"data.synthetic={data_cfg.synthetic}"}
    p = _shard_dirs(data_cfg)[0][0]
    return tokenizer_identity(load_manifest(p), Path(p).absolute() / MANIFEST)


def _synthetic_source(data_cfg, seq_len: int, vocab_size: int, stream: int):
    cls = {"copy": CopyTaskSource, "random": RandomTokenSource}[data_cfg.synthetic]
    return cls(seq_len, vocab_size, data_cfg.seed, stream)


def build_sampler(data_cfg, *, seq_len: int, vocab_size: int, split: str = "train") -> GlobalSampler:
    """The GlobalSampler over a split of the configured data (shards, blend or synthetic)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    valid = split == "valid"
    if data_cfg.synthetic != "none":
        src = _synthetic_source(data_cfg, seq_len, vocab_size, STREAM_VALID if valid else STREAM_TRAIN)
        return GlobalSampler([src], None, data_cfg.seed)
    sources, weights = [], []
    for s, w in _open_sets(data_cfg, vocab_size):
        if not s.has_split(split):
            raise DataError(f"{s.manifest_path}: has no {split!r} split"
                            + (" (prepared with --valid-fraction 0?)" if valid else ""))
        sources.append(ShardSampleSource(s.split(split), seq_len, f"{s.path}:{split}", wrap=valid))
        weights.append(w)
    # validation walks each source in file order (no shuffle) so the batches are a fixed set
    return GlobalSampler(sources, weights, data_cfg.seed, shuffle=not valid)


def _to_batch(samples: np.ndarray) -> Batch:
    t = torch.from_numpy(samples)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


# ----------------------------------------------------------------------------------------------
# The training loader


class TrainLoader:
    """Yields, per optimizer step, this rank's micro batches. State is `consumed_samples` (global
    samples consumed by finished steps, the same on every rank). A background thread prepares up to
    `prefetch` steps ahead; batches depend only on positions, so prefetching changes nothing."""

    def __init__(self, sampler: GlobalSampler, *, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, consumed_samples: int = 0, prefetch: int = 0):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch < 1 or global_batch < 1 or global_batch % (dp_size * micro_batch):
            raise ValueError(f"global_batch={global_batch} must be a multiple of dp_size x micro_batch = "
                             f"{dp_size} x {micro_batch}")
        if consumed_samples < 0 or prefetch < 0:
            raise ValueError("consumed_samples and prefetch must be >= 0")
        self.sampler = sampler
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum = global_batch // (dp_size * micro_batch)
        self.prefetch = prefetch
        self._consumed = int(consumed_samples)
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._queue: queue.Queue | None = None
        self._closed = False

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def batches_at(self, consumed: int) -> list[Batch]:
        """The micro batches of the step that starts after `consumed` global samples (pure function)."""
        samples = self.sampler.samples(rank_slice(consumed, self.global_batch, self.dp_rank, self.dp_size))
        m = self.micro_batch
        return [_to_batch(samples[i * m:(i + 1) * m]) for i in range(self.grad_accum)]

    def _worker(self, start: int, stop: threading.Event, q: queue.Queue) -> None:
        c = start
        while not stop.is_set():
            try:
                item = (c, self.batches_at(c))
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = (c, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item[1], BaseException):
                return
            c += self.global_batch

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._worker, args=(self._consumed, self._stop, self._queue),
                                        name="mgt-data-prefetch", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while True:  # unblock a worker waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
        self._thread = self._stop = self._queue = None

    def next_step(self) -> list[Batch]:
        """This rank's micro batches (grad_accum of them) for the next step: (inputs, targets) pairs
        of LongTensor[micro_batch, seq_len]. Advances consumed_samples by global_batch."""
        if self._closed:
            raise RuntimeError("TrainLoader is closed")
        if self.prefetch == 0:
            out = self.batches_at(self._consumed)
        else:
            if self._thread is None:
                self._start()
            while True:
                try:
                    c, out = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("data prefetch thread died") from None
            if isinstance(out, BaseException):
                self._halt()
                raise out
            assert c == self._consumed, f"prefetch out of step: got {c}, expected {self._consumed}"
        self._consumed += self.global_batch
        return out

    def __iter__(self):
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        return {"consumed_samples": self._consumed, "global_batch": self.global_batch,
                "data": self.sampler.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state` (from any rank, any dp_size): the next step starts at its consumed_samples."""
        if "consumed_samples" not in state:
            raise ValueError("loader state lacks 'consumed_samples'")
        fp = state.get("data")
        if fp is not None and fp != self.sampler.fingerprint():
            warnings.warn(f"resuming the data loader on different data than it was saved with "
                          f"({fp} -> {self.sampler.fingerprint()}): the sample order will not continue exactly")
        self._halt()
        self._consumed = int(state["consumed_samples"])

    def close(self) -> None:
        self._halt()
        self._closed = True

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._halt()
        except Exception:
            pass


def build_train_loader(data_cfg, *, seq_len: int, global_batch: int, micro_batch: int, dp_rank: int,
                       dp_size: int, vocab_size: int, consumed_samples: int = 0,
                       prefetch: int | None = None) -> TrainLoader:
    """The training loader for this data-parallel rank. Opens and checks the shards (size and counts
    always, sha256 when data_cfg.verify_checksums), errors naming the file if anything is off."""
    sampler = build_sampler(data_cfg, seq_len=seq_len, vocab_size=vocab_size, split="train")
    return TrainLoader(sampler, global_batch=global_batch, micro_batch=micro_batch, dp_rank=dp_rank,
                       dp_size=dp_size, consumed_samples=consumed_samples,
                       prefetch=data_cfg.prefetch if prefetch is None else prefetch)


def build_valid_batches(data_cfg, seq_len: int, batch_size: int, num_batches: int,
                        vocab_size: int) -> list[Batch]:
    """A fixed list of `num_batches` (inputs, targets) batches from the validation split, in file
    order (wrapping around if the split is small); synthetic data uses a separate seed stream."""
    if batch_size < 1 or num_batches < 0:
        raise ValueError("batch_size must be >= 1 and num_batches >= 0")
    sampler = build_sampler(data_cfg, seq_len=seq_len, vocab_size=vocab_size, split="valid")
    out = []
    for b in range(num_batches):
        out.append(_to_batch(sampler.samples(np.arange(b * batch_size, (b + 1) * batch_size))))
    return out


def open_shards(path: str | Path, full_checksums: bool = True) -> ShardSet:
    """Open and check one prep output (for tools and tests)."""
    return ShardSet(path, full_checksums=full_checksums)
