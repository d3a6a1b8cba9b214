# Our own loss on a text, windowed as lm-eval's rolling loglikelihood windows it, so the two agree to
# rounding (`mgt eval` prints both). The relation to the training's validation loss:
# - the trainer's validation samples (mgt_scale.data.loader.ShardSampleSource) are windows of
#   max_seq_len + 1 tokens cut every max_seq_len tokens from the split's token stream, in which every
#   document follows the EOS of the one before; each window predicts max_seq_len tokens;
# - lm-eval scores a document d as the stream [EOS] + d (EOS: the tokenizer's prefix token, as our
#   tokenizer has no BOS): its first window predicts d's first max_seq_len tokens from EOS, each further
#   one the next max_seq_len tokens from the max_seq_len tokens before them: the same windows as ours.
#   Only the last, partial window differs: lm-eval scores the remaining tokens with a full window of
#   context, where our validation sampler leaves them out.
# `stream_nll` cuts the full windows with ShardSampleSource itself and adds lm-eval's last window.
from __future__ import annotations

import numpy as np
import torch

from mgt_scale.data.loader import ShardSampleSource
from mgt_scale.model import lm_loss


class _Tokens:
    """An in-memory token stream with the interface ShardSampleSource reads (num_tokens, read)."""

    def __init__(self, ids):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.num_tokens = len(self.ids)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.ids[start:stop]


@torch.no_grad()
def stream_nll(model, ids: list[int], prefix_id: int, seq_len: int) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens predicted) of document `ids` after `prefix_id`."""
    stream = [prefix_id] + list(ids)
    total, count = 0.0, 0
    n_full = 0
    if len(stream) > seq_len:
        src = ShardSampleSource(_Tokens(stream), seq_len, "text")
        n_full = src.num_samples
        for i in range(n_full):
            w = torch.from_numpy(src.get(np.array([i])))
            total += float(lm_loss(model(w[:, :-1]), w[:, 1:])) * seq_len
            count += seq_len
    rest = len(stream) - 1 - n_full * seq_len  # tokens not predicted yet: the last ones
    if rest > 0:
        w = torch.tensor([stream[max(0, len(stream) - seq_len - 1):]])
        mask = torch.zeros(1, w.shape[1] - 1, dtype=torch.bool)
        mask[:, -rest:] = True
        total += float(lm_loss(model(w[:, :-1]), w[:, 1:], mask)) * rest
        count += rest
    return total, count
