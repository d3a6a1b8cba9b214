# Micro-benchmark of one residual operator (forward + backward of an FFN sublayer and its residual
# update), fused path vs the paper's formulas op by op (`mgt.fused: false`), every residual form, calls
# interleaved so that the machine's slow spells hit all rows alike. Prints one table: median ms per call,
# fused / reference, and each row over pre-LN. Usage:
#   OMP_NUM_THREADS=1 python bench/residual_op.py [--width 128] [--tokens 1024] [--calls 40]
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mgt_scale.config import MGTConfig, ModelConfig
from mgt_scale.model import ResidualOp

FORMS = {  # row name -> (residual kind, mgt options)
    "mgt full": ("mgt", {}),
    "mgt low-rank r=16": ("mgt", {"proj_rank": 16}),
    "mgt low-rank r=16, token beta": ("mgt", {"proj_rank": 16, "beta_shape": "token"}),
    "mhc_gate": ("mhc_gate", {}),
    "ddl": ("ddl", {}),
}


def build(kind: str, width: int, fused: bool, mgt: dict) -> ResidualOp:
    cfg = ModelConfig(residual=kind, d_model=width, mgt=MGTConfig(fused=fused, **mgt))
    op = ResidualOp(cfg)
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    if op.use_beta:
        with torch.no_grad():
            op.alpha.fill_(0.3)  # a trained-looking alpha; the kernels that run are the same at 0
    return op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=1024, help="batch x sequence")
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    d = args.width
    ffn = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
    x = torch.randn(args.tokens // 128, 128, d, requires_grad=True)
    ops = {("preln", "-"): build("preln", d, True, {})}
    for name, (kind, mgt) in FORMS.items():
        for fused in (True, False):
            ops[(name, "fused" if fused else "reference")] = build(kind, d, fused, mgt)
    times: dict = {k: [] for k in ops}
    for i in range(args.calls + 3):
        for key, op in ops.items():
            tic = time.perf_counter()
            op(x, ffn).sum().backward()
            if i >= 3:
                times[key].append(time.perf_counter() - tic)
    med = {k: statistics.median(v) for k, v in times.items()}
    pre = med[("preln", "-")]
    print(f"# one residual op fwd+bwd, FFN sublayer, width {d}, {args.tokens} tokens, "
          f"median of {args.calls} interleaved calls, {torch.get_num_threads()} thread(s)")
    print("| form | path | ms | fused / reference | x preln |")
    print("|---|---|---|---|---|")
    print(f"| preln | - | {1e3 * pre:.2f} | | 1.000 |")
    for name in FORMS:
        f, r = med[(name, "fused")], med[(name, "reference")]
        print(f"| {name} | fused | {1e3 * f:.2f} | {f / r:.3f} | {f / pre:.3f} |")
        print(f"| {name} | reference | {1e3 * r:.2f} | | {r / pre:.3f} |")


if __name__ == "__main__":
    main()
