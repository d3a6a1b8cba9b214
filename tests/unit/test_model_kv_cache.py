# Incremental decoding with a KV cache (MGTModel.forward(tokens, cache=KVCache)): for every residual kind,
# the last position's logits equal the uncached forward's to 1e-5 in fp32 (prefill, one token at a time,
# and several tokens at once after a prefix); greedy generation with the cache equals the uncached one
# token for token, also past max_seq_len (where the sampler recomputes on the cut window); the forward
# without a cache is the training forward, bit for bit.
import pytest
import torch

from mgt_scale.config import RESIDUAL_KINDS as KINDS
from mgt_scale.config import DDLDeltaConfig, MGTConfig, MHCConfig, ModelConfig
from mgt_scale.model import KVCache, build_model

VOCAB = 61


def tiny(kind, **kw):
    cfg = ModelConfig(num_layers=3, d_model=32, num_heads=4, d_ff=64, vocab_size=VOCAB, max_seq_len=24,
                      residual=kind, **kw)
    model = build_model(cfg, seed=3).eval()
    with torch.no_grad():  # MGT gates/betas start near constant: make them matter
        for name, p in model.named_parameters():
            if "_res." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return cfg, model


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_uncached(kind):
    cfg, model = tiny(kind)
    toks = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(toks)
        cache = KVCache(cfg.num_layers)
        out = model(toks[:, :7], cache=cache)  # prefill
        torch.testing.assert_close(out, full[:, :7], rtol=0, atol=1e-5)
        for t in range(7, 12):  # one token at a time
            out = model(toks[:, t:t + 1], cache=cache)
            assert cache.length == t + 1
            torch.testing.assert_close(out[:, -1], full[:, t], rtol=0, atol=1e-5)
        out = model(toks[:, 12:20], cache=cache)  # several new tokens after a cached prefix
        torch.testing.assert_close(out, full[:, 12:20], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["mgt", "ddl"])
def test_cached_logits_low_rank_and_reference_path(kind):
    cfg, model = tiny(kind, mgt=MGTConfig(proj_rank=8, fused=False))
    toks = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(toks)
        cache = KVCache(cfg.num_layers)
        model(toks[:, :5], cache=cache)
        for t in range(5, 16):
            torch.testing.assert_close(model(toks[:, t:t + 1], cache=cache)[:, -1], full[:, t], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,opts", [("mhc", {"mhc": MHCConfig(num_streams=1)}),
                                       ("mhc", {"mhc": MHCConfig(num_streams=3, sinkhorn_iters=5)}),
                                       ("ddl_delta", {"ddl_delta": DDLDeltaConfig(value="norm")}),
                                       ("ddl_delta", {"ddl_delta": DDLDeltaConfig(value="sublayer")})])
def test_cached_logits_published_baseline_options(kind, opts):
    cfg, model = tiny(kind, **opts)
    toks = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(toks)
        cache = KVCache(cfg.num_layers)
        model(toks[:, :4], cache=cache)
        for t in range(4, 14):
            torch.testing.assert_close(model(toks[:, t:t + 1], cache=cache)[:, -1], full[:, t], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_equals_uncached_past_max_seq_len(kind):
    from mgt_scale.train.sampling import sample
    cfg, model = tiny(kind)
    prompt = [5, 17, 3, 40]
    n = 30  # prompt + 30 > max_seq_len 24: the last steps run on the cut window
    a = sample(model, prompt, n, 0.0, 0, cfg.max_seq_len, use_cache=True)
    b = sample(model, prompt, n, 0.0, 0, cfg.max_seq_len, use_cache=False)
    assert len(a) == n and a == b


def test_sampled_tokens_equal_and_vocab_limit_respected():
    from mgt_scale.train.sampling import sample
    cfg, model = tiny("mgt")
    a = sample(model, [1, 2], 20, 1.0, 7, cfg.max_seq_len, use_cache=True, vocab_limit=10)
    b = sample(model, [1, 2], 20, 1.0, 7, cfg.max_seq_len, use_cache=False, vocab_limit=10)
    assert a == b and max(a) < 10
    assert max(sample(model, [1, 2], 20, 0.0, 7, cfg.max_seq_len, vocab_limit=4)) < 4


def test_forward_without_cache_is_bit_identical_to_training_forward():
    """The training forward (no cache argument) against a hand-rolled stack of the same modules with the
    code as it was before the cache existed: rotary tables from position 0, causal SDPA."""
    import torch.nn.functional as F
    from mgt_scale.model.layers import apply_rotary, rotary_tables
    cfg, model = tiny("mgt")
    toks = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))

    def attn(m, x):
        B, T, C = x.shape
        q, k, v = m.qkv(x).view(B, T, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rotary_tables(T, m.head_dim, m.rope_base, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return m.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))

    with torch.no_grad():
        x = model.embed(toks)
        for b in model.blocks:
            x = b.ffn_res(b.attn_res(x, lambda h, b=b: attn(b.attn, h)), b.ffn)
        ref = model.head(x)
        assert torch.equal(model(toks), ref)
    # and training mode with gradients
    model.train()
    out = model(toks)
    out.float().sum().backward()
    assert torch.equal(out.detach(), ref)


def test_rotary_offset_rows_equal_full_table_rows():
    from mgt_scale.model.layers import rotary_tables
    cos, sin = rotary_tables(40, 8, 10000.0, "cpu", torch.float32)
    c2, s2 = rotary_tables(5, 8, 10000.0, "cpu", torch.float32, start=33)
    assert torch.equal(c2, cos[33:38]) and torch.equal(s2, sin[33:38])
