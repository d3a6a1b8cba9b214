# The chunked LM loss (mgt_scale/model/loss.py): the value and gradient of F.cross_entropy in fp32 (with and
# without a mask, fp32 and bf16 logits, chunks that do not divide the rows), and at a size above
# CHUNK_ELEMENTS `lm_loss` keeps no fp32 copy of the logits for the backward.
import pytest
import torch
import torch.nn.functional as F

from mgt_scale.model import lm_loss
from mgt_scale.model.loss import CHUNK_ELEMENTS, chunked_lm_loss


def plain_loss(logits, targets, mask=None):
    """lm_loss as it was before the chunked path: F.cross_entropy over an fp32 copy of the logits."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    if mask is None:
        return loss.mean()
    m = mask.reshape(-1).to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def value_and_grad(fn, logits, targets, mask):
    z = logits.detach().clone().requires_grad_(True)
    loss = fn(z, targets, mask)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_equals_cross_entropy(dtype, masked):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.4) if masked else None
    want, want_grad = value_and_grad(plain_loss, logits, targets, mask)
    for chunk_elements in (50, 4 * 50, 1 << 20):  # one row per chunk, 4 rows (21 = 5 x 4 + 1), one chunk
        got, grad = value_and_grad(lambda z, t, m: chunked_lm_loss(z, t, m, chunk_elements), logits, targets, mask)
        assert got.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        if dtype == torch.float32:
            torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-8)
        else:  # the same fp32 gradient, rounded to bf16 once
            torch.testing.assert_close(grad, want_grad, rtol=2 ** -7, atol=1e-6)


def test_fully_masked_batch_gives_zero_loss_and_gradient():
    logits = torch.randn(2, 3, 11, requires_grad=True)
    loss = chunked_lm_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), chunk_elements=11)
    loss.backward()
    assert float(loss) == 0.0 and not logits.grad.any()


@pytest.mark.slow
def test_large_logits_keep_no_fp32_copy_for_the_backward():
    """bf16 logits of CHUNK_ELEMENTS + a row: nothing saved for the backward is an fp32 tensor the size of the
    logits (F.cross_entropy over `.float()` saves its fp32 log-softmax, 4 bytes a logit)."""
    vocab = 4096
    rows = CHUNK_ELEMENTS // vocab + 1
    logits = torch.randn(rows, vocab, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    big_fp32 = []

    def pack(t):
        if t.dtype == torch.float32 and t.numel() >= rows * vocab:
            big_fp32.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(logits[None], targets[None])
    assert not big_fp32, big_fp32
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    want = plain_loss(logits.detach()[None], targets[None])
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=0)
