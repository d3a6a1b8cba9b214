# Generated training data for experiments and benchmarks, served through the same sampler/loader
# API as token shards: `copy` (the synthetic copy task, with its loss/accuracy mask) and `random`
# (uniform tokens). Every sample is a pure function of (seed, stream, sample index).
"""Copy-task layout for samples of L + 1 tokens (inputs = sample[:-1], targets = sample[1:]):

    sample = [x_0 .. x_{n-1}, SEP, x_0 .. x_{n-1}] (+ one trailing SEP when L is odd),  n = L // 2

with SEP = vocab_size - 1 and x_i uniform in [0, vocab_size - 1). Target position j predicts
sample[j + 1]; the copied half is sample[n + 1 .. 2n], i.e. target positions n .. 2n - 1, which is
what `copy_task_mask` selects. The first half is unpredictable noise and should be masked out of
loss and accuracy."""
from __future__ import annotations

import numpy as np
import torch

STREAM_TRAIN = 0
STREAM_VALID = 1


_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on a uint64 array (wrapping arithmetic): a cheap, well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_tokens(seed: int, stream: int, indices: np.ndarray, length: int, high: int) -> np.ndarray:
    """[len(indices), length] int64 tokens in [0, high): token j of sample i is a hash of
    (seed, stream, i, j), so every sample is reproducible on its own (whichever rank or batch asks
    for it) and whole batches are generated vectorised (a per-sample numpy Generator was ~10x slower)."""
    key = np.uint64(((int(seed) & _M64) * 0x9E3779B97F4A7C15 + int(stream) * 0xD1B54A32D192ED03) & _M64)
    per_sample = _splitmix64(np.asarray(indices, dtype=np.uint64) ^ key)
    per_token = _splitmix64(per_sample[:, None] + np.arange(length, dtype=np.uint64)[None, :])
    return (per_token % np.uint64(high)).astype(np.int64)


class CopyTaskSource:
    """Unbounded copy-task samples of `seq_len + 1` tokens."""

    num_samples = None

    def __init__(self, seq_len: int, vocab_size: int, seed: int, stream: int = STREAM_TRAIN):
        if vocab_size < 3:
            raise ValueError(f"the copy task needs vocab_size >= 3, got {vocab_size}")
        if seq_len < 2:
            raise ValueError(f"the copy task needs seq_len >= 2, got {seq_len}")
        self.seq_len, self.vocab_size, self.seed, self.stream = seq_len, vocab_size, seed, stream
        self.sep_id = vocab_size - 1
        self.n = seq_len // 2
        self.name = f"synthetic:copy(vocab={vocab_size},seed={seed},stream={stream})"

    def get(self, indices: np.ndarray) -> np.ndarray:
        out = np.full((len(indices), self.seq_len + 1), self.sep_id, dtype=np.int64)
        n = self.n
        x = hashed_tokens(self.seed, self.stream, indices, n, self.vocab_size - 1)
        out[:, :n] = x
        out[:, n + 1: 2 * n + 1] = x
        return out


class RandomTokenSource:
    """Unbounded samples of uniform random tokens (for throughput benchmarks)."""

    num_samples = None

    def __init__(self, seq_len: int, vocab_size: int, seed: int, stream: int = STREAM_TRAIN):
        self.seq_len, self.vocab_size, self.seed, self.stream = seq_len, vocab_size, seed, stream
        self.name = f"synthetic:random(vocab={vocab_size},seed={seed},stream={stream})"

    def get(self, indices: np.ndarray) -> np.ndarray:
        return hashed_tokens(self.seed, self.stream, indices, self.seq_len + 1, self.vocab_size)


def loss_mask_fn(data_cfg):
    """The training and validation loss's mask function (targets -> bool mask) of a data config:
    `copy_task_mask` for the copy task with `data.copy_loss: copied`, else None (every position)."""
    if data_cfg.synthetic == "copy" and getattr(data_cfg, "copy_loss", "all") == "copied":
        return copy_task_mask
    return None


def copy_task_mask(targets: torch.Tensor) -> torch.Tensor:
    """Bool mask, same shape as `targets` ([..., seq_len]), True at the positions that predict the
    copied half of a copy-task sample (target positions n .. 2n - 1, n = seq_len // 2)."""
    seq_len = targets.shape[-1]
    n = seq_len // 2
    mask = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    mask[..., n: 2 * n] = True
    return mask
