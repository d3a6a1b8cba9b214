# The Transformer stack: TokenEmbedding -> num_layers identical Blocks -> Head (final norm + LM head).
# Written so a pipeline can cut it: embedding, blocks and head are separate modules with stable names
# (`embed.*`, `blocks.{i}.*`, `head.*`), and each is initialised from its own seeded generator, so a
# block gets the same weights whichever rank or stage builds it. Pure torch: no DeepSpeed import.
# `forward(tokens, cache=KVCache(...))` decodes incrementally (mgt_scale.train.sampling); without a cache
# the forward is the training one, unchanged.
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgt_scale.config import ModelConfig
from mgt_scale.model.layers import CausalSelfAttention, FeedForward, LayerKV, normal_from_cpu_
from mgt_scale.model.loss import CHUNK_ELEMENTS, chunked_lm_loss
from mgt_scale.model.recompute import checkpoint_segment
from mgt_scale.model.residual import deepnorm_constants
from mgt_scale.model.residual_baselines import expand_streams, make_residual_op, num_streams, reduce_streams


def module_generator(seed: int, index: int) -> torch.Generator:
    """Generator for one pipeline-cuttable unit: index 0 = embedding, 1..L = blocks, L+1 = head."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed * 1_000_003 + index)
    return g


def _xavier_(t: torch.Tensor, gain: float, gen: torch.Generator) -> None:
    fan_out, fan_in = t.shape
    normal_from_cpu_(t, gain * math.sqrt(2.0 / (fan_in + fan_out)), gen)


class TokenEmbedding(nn.Module):
    """Token lookup; for `mhc`, expanded to the n residual streams ([B, T, n*d])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.num_streams = num_streams(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return expand_streams(self.tok(tokens), self.num_streams)

    @torch.no_grad()
    def init_weights(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        normal_from_cpu_(self.tok.weight, cfg.init_std, gen)


class Block(nn.Module):
    """Attention sublayer then FFN sublayer, each updating the stream through its ResidualOp."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn = CausalSelfAttention(cfg.d_model, cfg.num_heads, cfg.rope_base)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff)
        self.attn_res = make_residual_op(cfg, 2 * layer_idx)
        self.ffn_res = make_residual_op(cfg, 2 * layer_idx + 1)

    def forward(self, x: torch.Tensor, cache: Optional[LayerKV] = None) -> torch.Tensor:
        # every residual kind updates each position from that position alone: only attention needs
        # the cache
        x = self.attn_res(x, self.attn if cache is None else functools.partial(self.attn, cache=cache))
        return self.ffn_res(x, self.ffn)

    @torch.no_grad()
    def init_weights(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        d = cfg.d_model
        if cfg.residual == "deepnorm":
            # DeepNet: xavier normal, gain b = (8N)^-1/4 for v, out and FFN; gain 1 for q and k.
            b = deepnorm_constants(cfg.num_layers)[1]
            q, k, v = self.attn.qkv.weight.split(d, dim=0)
            for w, gain in ((q, 1.0), (k, 1.0), (v, b), (self.attn.out.weight, b),
                            (self.ffn.up.weight, b), (self.ffn.down.weight, b)):
                _xavier_(w, gain, gen)
        else:
            out_std = cfg.init_std * ((2 * cfg.num_layers) ** -0.5 if cfg.depth_scaled_init else 1.0)
            normal_from_cpu_(self.attn.qkv.weight, cfg.init_std, gen)
            normal_from_cpu_(self.attn.out.weight, out_std, gen)
            normal_from_cpu_(self.ffn.up.weight, cfg.init_std, gen)
            normal_from_cpu_(self.ffn.down.weight, out_std, gen)
        self.attn_res.init_weights(cfg, gen)
        self.ffn_res.init_weights(cfg, gen)


class Head(nn.Module):
    """Final LayerNorm and the LM projection (its weight may be tied to the embedding's); for `mhc`, the
    streams are summed first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.num_streams = num_streams(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(reduce_streams(x, self.num_streams)))

    @torch.no_grad()
    def init_weights(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        self.norm.reset_parameters()
        normal_from_cpu_(self.proj.weight, cfg.init_std, gen)


class KVCache:
    """Keys and values of every block for incremental decoding: pass the same KVCache to successive
    `MGTModel.forward(new_tokens, cache=...)` calls, each with the tokens that follow the cached ones.
    Positions are absolute (rotary offset = `length`), so `length` + new tokens must stay within
    max_seq_len; past that the caller recomputes on a cut window with a fresh cache."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


class MGTModel(nn.Module):
    """Decoder-only LM: embed -> blocks -> head. `forward(tokens)` returns logits [B, T, vocab].

    Activation checkpointing: set `checkpoint_every` = k > 0 to recompute each segment of k blocks in
    the backward pass (torch non-reentrant checkpointing with `checkpoint_policy` "full" or "selective",
    mgt_scale.model.recompute; a parallel engine may substitute its own `checkpoint_fn`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.proj.weight = self.embed.tok.weight
        self.checkpoint_every = 0
        self.checkpoint_policy = "full"  # see mgt_scale.model.recompute
        self.checkpoint_fn: Optional[Callable] = None

    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter; the one place that documents initialisation.

        - embed.tok.weight ~ N(0, init_std)
        - blocks.i.attn.qkv.weight, blocks.i.ffn.up.weight ~ N(0, init_std)
        - blocks.i.attn.out.weight, blocks.i.ffn.down.weight ~ N(0, init_std * (2L)^-1/2) with
          depth_scaled_init (GPT-2 / Megatron scaling of the residual-branch outputs), else N(0, init_std)
        - deepnorm: xavier normal with gain (8L)^-1/4 for v, out, ffn.up, ffn.down; gain 1 for q, k
        - every LayerNorm: weight 1, bias 0
        - MGT operators (blocks.i.{attn,ffn}_res.*): see ResidualOp.init_weights (gate and beta rows ~
          N(0, d^-1/2) with mgt.proj_init: fan_in, the default, so gate and beta vary at init; with
          proj_init: std, N(0, gate_init_std) and N(0, beta_init_std); beta_bias = beta_bias_init,
          alpha = alpha_init)
        - mhc / ddl_delta operators: see MHCResidual / DeltaResidual.init_weights (residual_baselines.py)
        - head.proj.weight ~ N(0, init_std) (unless tied to the embedding)
        Each unit draws from its own generator (seed, unit index): the weights do not depend on how
        the stack is partitioned across pipeline stages or on the order units are built.
        """
        L = self.cfg.num_layers
        self.embed.init_weights(self.cfg, module_generator(seed, 0))
        for i, block in enumerate(self.blocks):
            block.init_weights(self.cfg, module_generator(seed, i + 1))
        if not self.cfg.tie_embeddings:
            self.head.init_weights(self.cfg, module_generator(seed, L + 1))
        else:
            self.head.norm.reset_parameters()

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        x = self.embed(tokens)
        if cache is not None:  # incremental decoding (inference only: no activation checkpointing)
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, layer_cache)
            return self.head(x)
        k = self.checkpoint_every
        if k and self.training and torch.is_grad_enabled():
            ckpt = self.checkpoint_fn or functools.partial(checkpoint_segment, policy=self.checkpoint_policy)
            for start in range(0, len(self.blocks), k):
                x = ckpt(_run_blocks(self.blocks[start:start + k]), x)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(x)


def _run_blocks(blocks: nn.ModuleList) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            x = b(x)
        return x
    return run


def build_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> MGTModel:
    """Build on the meta device, allocate once on `device`, then initialise: a 200-layer stack is
    never materialised twice (no default init followed by ours)."""
    with torch.device("meta"):
        model = MGTModel(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty breaks the tie
        model.head.proj.weight = model.embed.tok.weight
    model.init_weights(seed)
    return model.to(dtype)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (optionally over `mask`ed positions only). Logits larger than
    `loss.CHUNK_ELEMENTS` take the chunked path (mgt_scale/model/loss.py: no fp32 copy of the logits)."""
    if logits.numel() > CHUNK_ELEMENTS:
        return chunked_lm_loss(logits, targets, mask)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    if mask is None:
        return loss.mean()
    m = mask.reshape(-1).to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
