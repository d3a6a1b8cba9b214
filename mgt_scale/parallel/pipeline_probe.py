# The collapse monitor's probe in `pipeline` mode: no rank holds the whole stack, so each stage runs
# its own blocks on the probe batch, measures the geometry of the residual stream entering each of
# them (and the last stage, the stack's output), and passes its output activation to the next stage
# with a point-to-point send. The per-stage results are all-gathered, so every rank assembles the
# same geometry.jsonl record (and so takes the same alarm decision) as a `zero` run would.
"""Pipeline-parallel geometry probe.

Only data-parallel replica 0 of each stage computes (replicas hold identical weights); the other
replicas take part in the final all-gather with an empty contribution. Layer indices are global:
record ``layers[i]`` is the input of block ``i`` and ``layers[L]`` the output of the last block, and
MGT op statistics carry their global ``block`` and ``sublayer`` (``2 * block`` + 0 attn / 1 ffn),
exactly as :func:`mgt_scale.monitor.probe.probe_geometry` numbers them on a whole model.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mgt_scale.model import Block
from mgt_scale.monitor.metrics import baseline_op_stats, layer_geometry, make_geometry_record, mgt_op_stats


def _run_local_stage(funcs: list, x: Tensor, first_stage: bool) -> tuple[Tensor, list, list[int], list[dict]]:
    """Run this stage's embedding (first stage) and blocks; stop at the head. Returns the stage output,
    the captured inputs of the local blocks (+ the last local block's output), their global block
    indices, and the MGT op statistics of the local sublayers."""
    hiddens: list[Tensor] = []
    block_ids: list[int] = []
    ops: list[dict[str, Any]] = []
    saved = []

    def sink_for(block: int, kind: str):
        def sink(_op, cap: dict) -> None:
            st = mgt_op_stats(cap.get("beta"), cap.get("gate"), cap.get("alpha"), cap.get("update"), cap.get("x"))
            ops.append({"sublayer": 2 * block + (0 if kind == "attn" else 1), "block": block, "kind": kind, **st,
                        **baseline_op_stats(cap)})
        return sink

    try:
        for i, fn in enumerate(funcs):
            if isinstance(fn, Block):
                hiddens.append(x.detach())
                block_ids.append(fn.layer_idx)
                for kind in ("attn", "ffn"):
                    op = getattr(fn, f"{kind}_res")
                    saved.append((op, op.stats_sink))
                    op.stats_sink = sink_for(fn.layer_idx, kind)
                x = fn(x)
            elif first_stage and i == 0:
                x = fn(x)  # the embedding
            else:
                break  # final norm / head: not part of the residual stream
    finally:
        for op, old in saved:
            op.stats_sink = old
    return x, hiddens, block_ids, ops


@torch.no_grad()
def pipeline_probe_geometry(pipe_module, tokens: Tensor, step: int, d_model: int, num_layers: int,
                            center: bool = False) -> dict[str, Any]:
    """One geometry.jsonl record for a DeepSpeed ``PipelineModule`` of our stack (collective: every rank
    of the job must call it with the same probe ``tokens``)."""
    grid = pipe_module._grid
    stage, stages = pipe_module.stage_id, pipe_module.num_stages
    contribution: dict[str, Any] | None = None
    if grid.get_data_parallel_id() == 0:
        params = next(pipe_module.parameters())
        was_training = pipe_module.training
        pipe_module.eval()
        try:
            if stage == 0:
                x = tokens.to(params.device)
            else:
                x = torch.empty(tokens.shape[0], tokens.shape[1], d_model, dtype=params.dtype, device=params.device)
                dist.recv(x, src=grid.stage_to_global(stage - 1))
            x, hiddens, block_ids, ops = _run_local_stage(list(pipe_module.forward_funcs), x, stage == 0)
        finally:
            pipe_module.train(was_training)
        if stage < stages - 1:
            dist.send(x.contiguous(), dst=grid.stage_to_global(stage + 1))
        if block_ids and block_ids[-1] == num_layers - 1:
            hiddens.append(x.detach())  # the output of the last block of the stack
        layers = layer_geometry(hiddens, center=center) if hiddens else []
        first = block_ids[0] if block_ids else 0
        for row in layers:
            row["layer"] += first
        contribution = {"stage": stage, "layers": layers, "ops": ops}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, contribution)
    parts = sorted((g for g in gathered if g is not None), key=lambda g: g["stage"])
    layers = [row for p in parts for row in p["layers"]]
    ops = [op for p in parts for op in p["ops"]]
    if [row["layer"] for row in layers] != list(range(num_layers + 1)):
        raise RuntimeError(f"pipeline probe assembled layers {[r['layer'] for r in layers]}, "
                           f"expected 0..{num_layers}")
    return make_geometry_record(step, layers, ops)
