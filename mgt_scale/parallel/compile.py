# Regional torch.compile, applied from outside the model (as torchtitan's parallelize functions do):
# `parallel.compile: blocks` compiles each transformer block's forward in place, so that inductor fuses the
# MGT update's elementwise chain, the rotary tables and rotation, and the GELU, in the forward and in the
# backward, on CPU (C++/OpenMP kernels) and GPU (Triton) alike. The model code stays eager; both engines
# call `compile_blocks` (ZeRO: mgt_scale/engine/zero.py; pipeline: mgt_scale/engine/pipeline.py).
#
# Only `Block.forward` is compiled, not the module call: the hooks a parallel engine puts on a block
# (DeepSpeed ZeRO-3's parameter fetch and release with `parallel.zero3_fetch: block`) run eagerly around the
# compiled forward, which sees the gathered parameters. The blocks are identical modules, so they share
# one compiled graph (parameters are graph inputs; torch 2.13's default `inline_inbuilt_nn_modules`).
# Calls that the compiled graph is not for run the eager forward: KV-cache decoding, and the monitor's probe
# (a ResidualOp with a `stats_sink` hands Python objects out of the forward).
# With ZeRO-3's per-module fetch (`parallel.zero3_fetch: module`) DeepSpeed's hooks sit on the submodules,
# inside the compiled forward: the numbers stay right, but each hook (wrapped in torch.compiler.disable)
# breaks the graph (3 blocks gave 11 graphs and hit dynamo's recompile limit on the pre-backward hook), so the
# config refuses that combination. No compiled autograd is used (pytorch/pytorch#140091, #141646: it fails
# under ZeRO-3).
from __future__ import annotations

import torch
import torch.nn as nn

from mgt_scale.logs import get_logger
from mgt_scale.model.transformer import Block

log = get_logger(__name__)


def compile_block(block: Block) -> None:
    """Replace `block.forward` by a dispatcher: compiled for the training/eval forward, eager otherwise."""
    if getattr(block, "_mgt_eager_forward", None) is not None:
        return  # compiled already
    eager = block.forward  # the bound Block.forward
    compiled = torch.compile(eager)

    def forward(x: torch.Tensor, cache=None) -> torch.Tensor:
        if cache is not None or block.attn_res.stats_sink is not None or block.ffn_res.stats_sink is not None:
            return eager(x, cache)
        return compiled(x)

    block._mgt_eager_forward = eager
    block.forward = forward


def compile_blocks(model: nn.Module, mode: str = "blocks", verbose: bool = False) -> int:
    """Compile every Block of `model` (a MGTModel, a DeepSpeed PipelineModule's stage, or a wrapper of
    either) for `parallel.compile` = `mode`; returns how many were compiled (0 for mode "none"). `verbose`:
    say so (log, INFO), since the first step then takes minutes longer than the others."""
    if mode == "none":
        return 0
    if mode != "blocks":
        raise ValueError(f"parallel.compile {mode!r}: expected 'none' or 'blocks'")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        compile_block(block)
    if verbose and blocks:
        log.info(f"parallel.compile: blocks: {len(blocks)} blocks of this rank under torch.compile (one graph, "
                 "compiled in the first step and again at the first evaluation)")
    return len(blocks)
