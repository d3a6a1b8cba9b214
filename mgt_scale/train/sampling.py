# Autoregressive sampling with plain torch and the model's KV cache: `mgt generate`
# (mgt_scale/commands/generate.py), the KV-cache and Hugging Face tests, bench/generate_cache.py.
from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, ids: list[int], max_new_tokens: int, temperature: float, seed: int, max_seq_len: int,
           use_cache: bool = True, vocab_limit: int | None = None) -> list[int]:
    """Autoregressive sampling (temperature 0: greedy); the context is cut to the model's max_seq_len.

    With `use_cache` the prompt is run once and each new token then costs a one-position forward
    against the KV cache. Once the context is longer than max_seq_len, every step recomputes on the
    cut window of the last max_seq_len tokens, without a cache, exactly as the uncached sampler does:
    a sliding cache would keep hidden states computed with tokens that have left the window (and
    positions past max_seq_len), so its logits would differ from the model's on that window.
    `vocab_limit`: sample only among ids below it (the tokenizer's pieces), the rest masked."""
    from mgt_scale.model import KVCache
    gen = torch.Generator().manual_seed(seed)
    out = list(ids)
    cache = KVCache(len(model.blocks)) if use_cache else None
    for _ in range(max_new_tokens):
        if cache is not None and len(out) <= max_seq_len:
            # positions 0 .. len(out)-1: feed those not in the cache yet (the prompt, then one token)
            x = torch.tensor([out[cache.length:]], dtype=torch.long)
            logits = model(x, cache=cache)[0, -1].float()
        else:
            x = torch.tensor([out[-max_seq_len:]], dtype=torch.long)
            logits = model(x)[0, -1].float()
        if vocab_limit is not None and vocab_limit < logits.numel():
            logits[vocab_limit:] = float("-inf")
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
    return out[len(ids):]
