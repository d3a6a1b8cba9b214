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


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([int(seed), 0x5EED, int(stream), int(index)]))


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
        for row, i in enumerate(np.asarray(indices).tolist()):
            x = _rng(self.seed, self.stream, i).integers(0, self.vocab_size - 1, n)
            out[row, :n] = x
            out[row, n + 1: 2 * n + 1] = x
        return out


class RandomTokenSource:
    """Unbounded samples of uniform random tokens (for throughput benchmarks)."""

    num_samples = None

    def __init__(self, seq_len: int, vocab_size: int, seed: int, stream: int = STREAM_TRAIN):
        self.seq_len, self.vocab_size, self.seed, self.stream = seq_len, vocab_size, seed, stream
        self.name = f"synthetic:random(vocab={vocab_size},seed={seed},stream={stream})"

    def get(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(np.asarray(indices).tolist()):
            out[row] = _rng(self.seed, self.stream, i).integers(0, self.vocab_size, self.seq_len + 1)
        return out


def copy_task_mask(targets: torch.Tensor) -> torch.Tensor:
    """Bool mask, same shape as `targets` ([..., seq_len]), True at the positions that predict the
    copied half of a copy-task sample (target positions n .. 2n - 1, n = seq_len // 2)."""
    seq_len = targets.shape[-1]
    n = seq_len // 2
    mask = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    mask[..., n: 2 * n] = True
    return mask
