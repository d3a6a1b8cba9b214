# The Transformer stack: TokenEmbedding -> num_layers identical Blocks -> Head (final norm + LM head).
# Written so a pipeline can cut it: embedding, blocks and head are separate modules with stable names
# (`embed.*`, `blocks.{i}.*`, `head.*`), and each is initialised from its own seeded generator, so a
# block gets the same weights whichever rank or stage builds it. Pure torch: no DeepSpeed import.
# `forward(tokens, cache=KVCache(...))` decodes incrementally (mgt_scale.train.sampling); without a cache
# the forward is the training one, unchanged. `init_units` is the one initialisation path: the plain model,
# the ZeRO-3 partitioned build and the pipeline stages all run it. Activation checkpointing and compiling
# are applied from outside (mgt_scale.parallel.checkpointing, mgt_scale.parallel.compile).
from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgt_scale.config import ModelConfig
from mgt_scale.model.layers import CausalSelfAttention, FeedForward, LayerKV, normal_from_cpu_
from mgt_scale.model.loss import CHUNK_ELEMENTS, chunked_lm_loss
from mgt_scale.model.residual import deepnorm_constants
from mgt_scale.model.residual_baselines import expand_streams, make_residual_op, num_streams, reduce_streams


def module_generator(seed: int, index: int) -> torch.Generator:
    """Generator for one pipeline-cuttable unit: index 0 = embedding, 1..L = blocks, L+1 = head."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed * 1_000_003 + index)
    return g


def init_units(units: Iterable[tuple[nn.Module, int]], cfg: ModelConfig, seed: int,
               gather: Optional[Callable[[nn.Module], ContextManager[bool]]] = None) -> None:
    """Initialise each (unit, unit index) from `module_generator(seed, index)` through the unit's own
    `init_weights(cfg, gen)`: the one path every way of building the stack takes (MGTModel.init_weights,
    the ZeRO-3 partitioned build in mgt_scale.engine.zero, the pipeline stages in mgt_scale.parallel.pipeline),
    so their weights are equal by construction. `gather(unit)`: a context manager around each unit that
    makes its parameters whole and yields whether this process writes them (ZeRO-3: DeepSpeed's
    GatheredParameters with rank 0 as the modifier, passed in by the engine: this package never imports
    DeepSpeed); None: the parameters are local and this process writes them."""
    for unit, idx in units:
        with (gather(unit) if gather is not None else nullcontext(True)) as write:
            if write:
                unit.init_weights(cfg, module_generator(seed, idx))


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
        """Final norm to weight 1, bias 0; the projection drawn unless it is the embedding's (tied)."""
        self.norm.reset_parameters()
        if not cfg.tie_embeddings:
            normal_from_cpu_(self.proj.weight, cfg.init_std, gen)


class BlockStack(nn.ModuleList):
    """The blocks (`blocks.{i}`) with a forward that runs them in order. A parallel wrapper may replace
    this instance's forward from outside (mgt_scale.parallel.checkpointing: segments of k blocks
    recomputed in the backward) without renaming any parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x)
        return x


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

    Activation checkpointing is applied from outside, on `blocks` (a BlockStack):
    `mgt_scale.parallel.checkpointing.apply_activation_checkpointing(model, cfg.parallel)`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg)
        self.blocks = BlockStack(Block(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.proj.weight = self.embed.tok.weight

    def units(self) -> list[tuple[nn.Module, int]]:
        """(module, unit index) of every pipeline-cuttable unit: 0 the embedding, 1..L the blocks, L+1
        the head (with tied embeddings only its final norm is its own)."""
        return [(self.embed, 0), *((b, i + 1) for i, b in enumerate(self.blocks)), (self.head, self.cfg.num_layers + 1)]

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
        the stack is partitioned across pipeline stages or on the order units are built (`init_units`).
        """
        init_units(self.units(), self.cfg, seed)

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        x = self.embed(tokens)
        if cache is not None:  # incremental decoding (inference only: no activation checkpointing)
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, layer_cache)
            return self.head(x)
        return self.head(self.blocks(x))


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


def unit_params(cfg: ModelConfig) -> dict:
    """Parameter counts of one block, the embedding and the head (untied), counted on the meta device
    (no memory): the units ZeRO-3 fetches as one and the pipeline's layers."""
    with torch.device("meta"):
        units = {"block": Block(cfg, 0), "embedding": TokenEmbedding(cfg), "head": Head(cfg)}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in units.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
