# Micro-benchmark of one residual operator (forward + backward of an FFN sublayer and its residual
# update), every residual form, on three paths in one process, calls interleaved so that the machine's slow
# spells hit all rows alike:
#   reference  the paper's formulas op by op (`mgt.fused: false`), eager
#   eager      the fused path (`mgt.fused: true`), eager
#   compile    the fused path with the sublayer and the update under torch.compile (inductor), as
#              `parallel.compile: blocks` compiles each block (mgt_scale/parallel/compile.py)
# (Until commit 9c1b504 a fourth path, the C++ CPU kernel, ran beside them: bench/RESULTS.md section 6.)
# Prints one table: median ms per call per path, compile / eager, and each over pre-LN eager. Usage:
#   OMP_NUM_THREADS=1 python bench/residual_op.py [--width 128] [--tokens 1024] [--calls 40]
#                                                 [--paths reference,eager,compile]
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mgt_scale.config import MGTConfig, ModelConfig
from mgt_scale.model import ResidualOp

FORMS = {  # row name -> (residual kind, mgt options)
    "preln": ("preln", {}),
    "mgt full": ("mgt", {}),
    "mgt low-rank r=16": ("mgt", {"proj_rank": 16}),
    "mgt low-rank r=16, token beta": ("mgt", {"proj_rank": 16, "beta_shape": "token"}),
    "mhc_gate": ("mhc_gate", {}),
    "ddl": ("ddl", {}),
}
PATHS = ("reference", "eager", "compile")


class Sublayer(torch.nn.Module):
    """The residual operator around one FFN sublayer: the unit a compiled block is made of."""

    def __init__(self, op: ResidualOp, ffn: torch.nn.Module):
        super().__init__()
        self.op, self.ffn = op, ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.ffn)


def build(kind: str, width: int, path: str, mgt: dict, ffn: torch.nn.Module):
    """The operator of `kind` on `path` around `ffn`, as a callable x -> output; None where the path does
    not apply (pre-LN has no fused/reference distinction)."""
    if kind == "preln" and path == "reference":
        return None
    cfg = ModelConfig(residual=kind, d_model=width, mgt=MGTConfig(fused=path != "reference", **mgt))
    op = ResidualOp(cfg)
    op.init_weights(cfg, torch.Generator().manual_seed(0))
    if op.use_beta:
        with torch.no_grad():
            op.alpha.fill_(0.3)  # a trained-looking alpha; the kernels that run are the same at 0
    unit = Sublayer(op, ffn)
    return torch.compile(unit) if path == "compile" else unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=1024, help="batch x sequence")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--paths", default=",".join(PATHS))
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    torch.manual_seed(0)
    d = args.width
    ffn = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(4 * d, d))
    x = torch.randn(args.tokens // 128, 128, d, requires_grad=True)
    ops = {}
    for name, (kind, mgt) in FORMS.items():
        for path in paths:
            unit = build(kind, d, path, mgt, ffn)
            if unit is not None:
                ops[(name, path)] = unit
    tic = time.perf_counter()
    for unit in ops.values():  # compile before any timing
        unit(x).sum().backward()
    setup_s = time.perf_counter() - tic
    times: dict = {k: [] for k in ops}
    for i in range(args.calls + 3):
        for key, unit in ops.items():
            tic = time.perf_counter()
            unit(x).sum().backward()
            if i >= 3:
                times[key].append(time.perf_counter() - tic)
    med = {k: statistics.median(v) for k, v in times.items()}
    pre = med.get(("preln", "eager"))
    print(f"# one residual op fwd+bwd, FFN sublayer, width {d}, {args.tokens} tokens, median of {args.calls} "
          f"interleaved calls, {torch.get_num_threads()} thread(s), torch {torch.__version__}; first calls "
          f"(compile) {setup_s:.0f} s")
    cols = [p for p in PATHS if p in paths]
    ratios = [(a, b) for a, b in (("compile", "eager"), ("eager", "reference")) if a in cols and b in cols]
    print("| form | " + " | ".join(f"{p} ms" for p in cols) + " | " + " | ".join(f"{a} / {b}" for a, b in ratios)
          + " | " + " | ".join(f"{p} x preln" for p in cols) + " |")
    print("|---" * (1 + 2 * len(cols) + len(ratios)) + "|")
    for name in FORMS:
        cell = {p: med.get((name, p)) for p in cols}
        fmt = lambda v, k=1e3: "" if v is None else f"{k * v:.2f}"  # noqa: E731
        ratio = lambda a, b: "" if a is None or b is None else f"{a / b:.3f}"  # noqa: E731
        print(f"| {name} | " + " | ".join(fmt(cell[p]) for p in cols) + " | "
              + " | ".join(ratio(cell[a], cell[b]) for a, b in ratios) + " | "
              + " | ".join(ratio(cell[p], pre) for p in cols) + " |")


if __name__ == "__main__":
    main()
