# The global sample order: which sample sits at each position of the infinite, epoch-concatenated
# training stream, as a pure function of (seed, position). Per-epoch seeded permutations, Megatron-
# style weighted blending of several sources, and the contiguous per-rank slice of a step's batch.
"""Why positions: the loader's only state is `consumed_samples`. Step s of a run that has consumed
c samples covers global positions [c, c + G) for global batch G, and data-parallel rank r of D takes
[c + r*G/D, c + (r+1)*G/D). Since the order depends on neither D nor the micro batch size, a job
restarted on a different number of ranks (same G) continues exactly where it stopped."""
from __future__ import annotations

import functools
import threading
from typing import Protocol

import numpy as np

BLEND_PERIOD = 1 << 14  # blending indices repeat with this period (mixture exact to ~1/period)


class Source(Protocol):
    """Something that yields fixed-length samples of `sample_len` int64 tokens by index.
    `num_samples` None means unbounded (synthetic data): no permutation is applied."""

    num_samples: int | None
    name: str

    def get(self, indices: np.ndarray) -> np.ndarray: ...


class SampleOrder:
    """Position -> sample index for one source of N samples: epoch e = p // N is a permutation of
    range(N) drawn by numpy's PCG64 seeded with (seed, stream, e). `shuffle=False`: identity order."""

    def __init__(self, num_samples: int, seed: int, stream: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("a sample order needs at least one sample")
        self.n, self.seed, self.stream, self.shuffle = int(num_samples), int(seed), int(stream), shuffle
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                gen = np.random.Generator(np.random.PCG64([self.seed, self.stream, int(epoch)]))
                perm = gen.permutation(self.n)
                if len(self._cache) >= 2:  # a run walks epochs in order: keep current and next
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        within = positions % self.n
        if not self.shuffle:
            return within
        epochs = positions // self.n
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out


@functools.lru_cache(maxsize=16)
def build_blending_indices(weights: tuple[float, ...], size: int = BLEND_PERIOD) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending: at position i pick the source whose achieved count lags its target
    weight * i the most. Returns (source index per position, running index within that source)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(w), dtype=np.int64)
    src = np.empty(size, dtype=np.int64)
    local = np.empty(size, dtype=np.int64)
    for i in range(size):
        k = int(np.argmax(w * max(i, 1) - counts))
        src[i] = k
        local[i] = counts[k]
        counts[k] += 1
    src.flags.writeable = False
    local.flags.writeable = False
    return src, local


class GlobalSampler:
    """Maps global positions to samples, blending several sources by weight. With one source the
    position goes straight to that source's order; with several, position p falls in blending
    period b = p // P at offset o: source k = src[o], and it is that source's
    (b * count_k + local[o])-th position, walked in the source's own seeded order."""

    def __init__(self, sources: list, weights: list[float] | None, seed: int, shuffle: bool = True,
                 seed_stream_offset: int = 0):
        if not sources:
            raise ValueError("no data sources")
        self.sources = list(sources)
        self.weights = [1.0] * len(sources) if weights is None else [float(x) for x in weights]
        self.orders = [
            SampleOrder(s.num_samples, seed, seed_stream_offset + k, shuffle) if s.num_samples is not None else None
            for k, s in enumerate(self.sources)
        ]
        if len(self.sources) > 1:
            self._src, self._local = build_blending_indices(tuple(self.weights))
            self._counts = np.bincount(self._src, minlength=len(self.sources)).astype(np.int64)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample index within the source) for each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.sources) == 1:
            src = np.zeros_like(positions)
            local_pos = positions
        else:
            period, off = np.divmod(positions, BLEND_PERIOD)
            src = self._src[off]
            local_pos = period * self._counts[src] + self._local[off]
        idx = np.empty_like(positions)
        for k, order in enumerate(self.orders):
            sel = src == k
            if sel.any():
                idx[sel] = local_pos[sel] if order is None else order(local_pos[sel])
        return src, idx

    def samples(self, positions: np.ndarray) -> np.ndarray:
        """[len(positions), sample_len] int64 tokens for the given global positions."""
        src, idx = self.locate(positions)
        if len(self.sources) == 1:
            return self.sources[0].get(idx)
        first = None
        for k, s in enumerate(self.sources):
            sel = src == k
            if sel.any():
                part = s.get(idx[sel])
                if first is None:
                    first = np.empty((len(src), part.shape[1]), dtype=np.int64)
                first[sel] = part
        return first

    def fingerprint(self) -> dict:
        return {"sources": [s.name for s in self.sources], "num_samples": [s.num_samples for s in self.sources],
                "weights": self.weights}


def rank_slice(consumed: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """Global positions data-parallel rank `dp_rank` of `dp_size` reads in the step that starts after
    `consumed` samples: the rank's contiguous share of [consumed, consumed + global_batch)."""
    per_rank = global_batch // dp_size
    start = consumed + dp_rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)
