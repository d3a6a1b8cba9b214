# Chunked cross-entropy for the LM loss: the mean next-token loss of `transformer.lm_loss` without the fp32
# copy of the logits and the saved log-softmax that `F.cross_entropy(logits.float())` keeps for the backward.
# At a GPU shape (16 k tokens x 32 k vocabulary, bf16 logits) those are 2 + 4 + 4 bytes per logit, 5.4 GB,
# of which this keeps the bf16 logits alone (1.1 GB) plus one chunk's fp32 temporaries: the forward keeps
# only the per-row log-sum-exp, and the backward recomputes each chunk's softmax from the logits and writes
# its gradient straight into one tensor of the logits' dtype. Pure torch: CPU and GPU alike.
from __future__ import annotations

import torch

# logits above this many elements take the chunked path, in chunks of about this many (fp32: 64 MiB); at or
# below it `lm_loss` keeps F.cross_entropy, so small runs (every CPU run here) compute exactly as before
CHUNK_ELEMENTS = 1 << 24


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i w_i * (logsumexp(z_i) - z_i[t_i]) over the rows z_i of `logits` [N, V] (any float dtype; the
    arithmetic in fp32), `chunk` rows at a time. `weights` [N] fp32 holds each row's share of the mean."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, chunk: int):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            z = logits[s:s + chunk].float()
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, targets[s:s + chunk, None]).squeeze(1)
            total += ((lse[s:s + chunk] - picked) * weights[s:s + chunk]).sum()
        ctx.save_for_backward(logits, targets, weights, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets, weights, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad = torch.empty_like(logits)
        g = grad_total.float()
        for s in range(0, logits.shape[0], chunk):
            p = torch.exp(logits[s:s + chunk].float() - lse[s:s + chunk, None])  # softmax
            p.scatter_add_(1, targets[s:s + chunk, None], p.new_full((p.shape[0], 1), -1.0))
            p.mul_((g * weights[s:s + chunk])[:, None])
            grad[s:s + chunk] = p
        return grad, None, None, None


def chunked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask=None,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The value of `lm_loss(logits, targets, mask)` (fp32, to rounding), computed chunk by chunk."""
    z = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    if mask is None:
        w = torch.full((z.shape[0],), 1.0 / z.shape[0], dtype=torch.float32, device=z.device)
    else:
        m = mask.reshape(-1).to(torch.float32)
        w = m / m.sum().clamp_min(1.0)
    return ChunkedCrossEntropy.apply(z, t, w, max(1, chunk_elements // z.shape[1]))
