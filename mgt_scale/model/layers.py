# Sublayers of a block: causal self-attention with rotary position embeddings (the tables computed once
# and cached; through scaled_dot_product_attention; optionally appending to a KV cache for incremental
# decoding) and the GELU feed-forward network; and the one random draw every initialiser uses. Pure torch,
# no parallelism.
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerKV:
    """One attention layer's cache for incremental decoding: the rotated keys and the values of every
    position seen so far, [B, H, P, D] each (grown by concatenation: decoding is bounded by
    max_seq_len, so the copies stay small next to the matmuls)."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


def normal_from_cpu_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """t <- N(0, std^2), drawn in fp32 on the CPU from `gen`, then copied into t (any device or dtype).

    Every initialiser draws this way, never with `t.normal_(generator=gen)`: the seeded generators are
    CPU generators (`module_generator`), and torch refuses a CPU generator for a CUDA tensor. Under
    ZeRO-3 on GPUs the gathered parameters live on the GPU. Drawing on the CPU also gives the same
    weights on every device, and in fp32 on the CPU the same bits as an in-place draw."""
    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(t))


def rotary_tables(seq_len: int, head_dim: int, base: float, device, dtype,
                  start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim/2] for positions start .. start+seq_len-1 (computed, never
    stored, so no buffer has to be initialised or checkpointed). Each entry depends on its position
    alone, so the rows for an offset equal the same rows of a longer table bit for bit."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


_ROTARY_CACHE: dict = {}  # (head_dim, base, device, dtype, inference mode) -> (cos, sin) from position 0


def cached_rotary_tables(seq_len: int, head_dim: int, base: float, device, dtype,
                         start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_tables(...)`, bit for bit, as row views of one table per (head_dim, base, device, dtype),
    computed once and grown when a longer one is asked for: every layer of every step asked for the same
    table, and rebuilt it (6 small kernels each, 2 per layer and step on a GPU's launch-bound path).
    Computed afresh, not cached, while torch.compile traces (inductor fuses the table into the rotary
    kernel) or under a dispatch mode (fake or counting tensors must not be stored); inference-mode tables
    are kept apart, since autograd refuses to save them."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return rotary_tables(seq_len, head_dim, base, device, dtype, start)
    key = (head_dim, float(base), torch.device(device), dtype, torch.is_inference_mode_enabled())
    end = start + seq_len
    tables = _ROTARY_CACHE.get(key)
    if tables is None or tables[0].shape[0] < end:
        with torch.no_grad():
            tables = rotary_tables(max(end, 2 * tables[0].shape[0] if tables else end), head_dim, base, device, dtype)
        _ROTARY_CACHE[key] = tables
    return tables[0][start:end], tables[1][start:end]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotates pairs (x[..., :D/2], x[..., D/2:])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, rope_base: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.rope_base = rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: Optional[LayerKV] = None) -> torch.Tensor:
        """x: [B, T, C]. With `cache` (incremental decoding), x holds the T positions that follow the
        cache's P cached ones: rotary positions start at P, the new keys/values are appended to the
        cache, and each new position attends to the P cached ones and the new ones up to itself."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is None:
            cos, sin = cached_rotary_tables(T, self.head_dim, self.rope_base, x.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            P = cache.length
            cos, sin = cached_rotary_tables(T, self.head_dim, self.rope_base, x.device, q.dtype, start=P)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            k, v = cache.append(k, v)
            if P == 0 or T == 1:  # prefill: the usual causal mask; one new position: it sees every key
                y = F.scaled_dot_product_attention(q, k, v, is_causal=P == 0)
            else:  # query i (absolute position P+i) sees keys 0 .. P+i
                mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))
