# The geometry probe: runs the model on a fixed probe batch and captures, from outside the model, the
# residual stream entering every block plus the last block's output (forward hooks) and the MGT
# operator statistics (each ResidualOp's `stats_sink`). Model code is never modified; hooks and sinks
# are removed again even if the forward pass raises.
"""Capturing residual-stream states and MGT operator statistics for the monitor.

Model API used: ``model.blocks`` (an ``nn.ModuleList`` of blocks, each with ``attn_res`` and
``ffn_res`` residual operators that accept a ``stats_sink`` callable) and ``model(tokens)``.

Parallel engines: under ZeRO-3 the forward pass gathers partitioned parameters collectively, so
every rank must run the probe (only rank 0 needs to log the result). Pipeline mode holds only some
blocks per stage: :mod:`mgt_scale.parallel.pipeline_probe` runs each stage's blocks there and
gathers the per-stage results into the same record.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from mgt_scale.monitor.metrics import (baseline_op_stats, centred_energy_threshold, layer_geometry,
                                       make_geometry_record, mgt_op_stats)


def _blocks(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "module", model)  # DeepSpeed / DDP wrappers keep the model in .module
    blocks = getattr(inner, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"{type(inner).__name__} has no non-empty `blocks`: cannot probe its residual stream")
    return blocks


@torch.no_grad()
def capture_probe(model: nn.Module, tokens: Tensor, ops: bool = True) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Run ``model(tokens)`` once in eval mode without gradients and return

    * hiddens: ``num_blocks + 1`` detached tensors ``[batch, tokens, width]``: the input of every
      block (``hiddens[0]`` = embedding output) and the output of the last block;
    * op stats: one dict per MGT-family, ``mhc`` or ``ddl_delta`` residual sublayer in depth order
      (``sublayer``, ``block``, ``kind`` "attn"/"ffn", then the statistics of ``mgt_op_stats`` and
      ``baseline_op_stats``); empty for other residuals or with ``ops=False``. Statistics are reduced inside the sink, so no per-sublayer tensors are kept.
    """
    blocks = _blocks(model)
    hiddens: list[Tensor] = []
    op_stats: list[dict[str, Any]] = []
    handles = []
    saved_sinks: list[tuple[nn.Module, Any]] = []

    def pre_hook(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        hiddens.append(x.detach())
        return None

    def post_hook(_module, _args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        hiddens.append(out.detach())

    def make_sink(block_idx: int, kind: str):
        def sink(_op, cap: dict) -> None:
            st = mgt_op_stats(cap.get("beta"), cap.get("gate"), cap.get("alpha"), cap.get("update"), cap.get("x"))
            op_stats.append({"sublayer": len(op_stats), "block": block_idx, "kind": kind, **st,
                             **baseline_op_stats(cap)})
        return sink

    was_training = model.training
    try:
        for b in blocks:
            handles.append(b.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(post_hook))
        if ops:
            for i, b in enumerate(blocks):
                for kind in ("attn", "ffn"):
                    op = getattr(b, f"{kind}_res", None)
                    if op is not None and hasattr(op, "stats_sink"):
                        saved_sinks.append((op, op.stats_sink))
                        op.stats_sink = make_sink(i, kind)
        model.eval()
        model(tokens)
    finally:
        for h in handles:
            h.remove()
        for op, old in saved_sinks:
            op.stats_sink = old
        model.train(was_training)
    if len(hiddens) != len(blocks) + 1:
        raise RuntimeError(f"captured {len(hiddens)} residual states for {len(blocks)} blocks: "
                           "the model's forward did not run every block exactly once")
    return hiddens, op_stats


def capture_hidden_states(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """The ``num_blocks + 1`` residual-stream states of ``model(tokens)`` (see :func:`capture_probe`)."""
    return capture_probe(model, tokens, ops=False)[0]


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of a plain (unpartitioned) model, for a probe whose forward pass must not add
    fp32 rounding to the residual stream: the weights are the same numbers (fp32 -> fp64 is exact),
    only the arithmetic is wider. Costs a second copy of the model at twice the bytes."""
    inner = getattr(model, "module", model)
    return copy.deepcopy(inner).to(torch.float64)


def probe_geometry(model: nn.Module, tokens: Tensor, step: int, center: bool = False,
                   float64: bool = False) -> dict[str, Any]:
    """One geometry.jsonl record for ``model`` on the probe batch ``tokens`` at ``step``.

    ``float64``: run the probe's forward pass on a float64 copy of the model (:func:`float64_copy`;
    plain models only, not ZeRO-3-partitioned ones). Either way the centred metrics are undefined (NaN)
    where the centred energy is below the threshold of the *model's* parameter dtype
    (:func:`~mgt_scale.monitor.metrics.centred_energy_threshold`, 1.2e-4 for fp32): a token-specific part
    that small is below what the model itself resolves. Above it, a float64 forward gives the centred
    rank to ~1e-9, an fp32 one to ~5e-4 (docs/RESULTS.md, "The metric"). ``mgt probe`` and the experiment
    runner use float64; the in-training monitor uses the training dtype (ZeRO-3 partitions the model)."""
    # the centred part must be resolvable in the dtype the model itself computes in, whatever the probe's
    thr = centred_energy_threshold(next(iter(model.parameters())).dtype)
    if float64:
        model = float64_copy(model)
    hiddens, ops = capture_probe(model, tokens)
    return make_geometry_record(step, layer_geometry(hiddens, center=center, min_centred_energy=thr), ops)
