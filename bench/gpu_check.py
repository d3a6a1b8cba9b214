# Correctness checks of the model on an accelerator, for the one short device run that
# bench/gpu_check.sh makes (see bench/RESULTS.md, "GPU checks"). CI has no GPU, so the unit tests only
# ever run the CPU path; this script runs the same claims on `--device` (cuda by default, cpu for a dry
# run here): initialisation on the device equals the CPU's bit for bit, the fused MGT update equals the
# op-by-op reference in fp32 (TF32 off), and so do the blocks under torch.compile, activation
# checkpointing leaves fp32 gradients unchanged, and a bf16 model trains (its loss falls and follows the
# fp32 run's). One JSON line per check, then a table; exit 1 if any check fails.
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mgt_scale.config import MGTConfig, ModelConfig
from mgt_scale.model import ResidualOp, build_model, lm_loss
from mgt_scale.parallel.compile import compile_blocks

FORMS = {  # name -> (residual, mgt options)
    "preln": ("preln", {}),
    "mgt full": ("mgt", {}),
    "mgt r=4 token beta": ("mgt", {"proj_rank": 4, "beta_shape": "token"}),
    "mgt channel alpha": ("mgt", {"alpha_shape": "channel"}),
    "mhc_gate": ("mhc_gate", {}),
    "ddl": ("ddl", {"lam": 1.3, "eps": -0.1}),
}


def cfg_of(residual: str, mgt: dict, layers: int = 2, width: int = 64, **model) -> ModelConfig:
    return ModelConfig(num_layers=layers, d_model=width, num_heads=4, d_ff=2 * width, vocab_size=128,
                       residual=residual, mgt=MGTConfig(**mgt), **model)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to b's largest entry."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def check_init(dev) -> list[dict]:
    """build_model on the device gives the CPU's weights bit for bit (every draw is made on the CPU)."""
    rows = []
    for name, (residual, mgt) in FORMS.items():
        cfg = cfg_of(residual, mgt)
        cpu, here = build_model(cfg, seed=3).state_dict(), build_model(cfg, seed=3, device=dev).state_dict()
        bad = [k for k in cpu if not torch.equal(cpu[k], here[k].cpu())]
        rows.append({"check": "init equals CPU", "form": name, "ok": not bad, "detail": f"{len(bad)} tensors differ"})
    return rows


def model_grads(cfg: ModelConfig, dev, tokens, checkpoint_every: int = 0, compiled: bool = False):
    """Logits and every parameter gradient of `cfg` (fp32, seed 3) on `tokens`; `compiled`: each block under
    torch.compile, as `parallel.compile: blocks` runs it."""
    model = build_model(cfg, seed=3, device=dev)
    from mgt_scale.config import ParallelConfig
    from mgt_scale.parallel.checkpointing import apply_activation_checkpointing
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=checkpoint_every > 0,
                                                         checkpoint_every_layers=max(checkpoint_every, 1)))
    if compiled:
        compile_blocks(model)
    with torch.no_grad():  # move alpha off its zero init, so the alpha X term is exercised
        for op in (m for m in model.modules() if isinstance(m, ResidualOp) and m.use_beta):
            op.alpha.copy_(torch.linspace(-0.4, 0.6, op.alpha.numel()))
    out = model(tokens)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check_fused(dev) -> list[dict]:
    """Fused update against the paper's formulas op by op (mgt.fused: false): outputs 1e-6, gradients
    1e-5 relative, as tests/unit/test_model_residual.py holds the CPU paths."""
    rows = []
    tokens = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(5)).to(dev)
    for name, (residual, mgt) in FORMS.items():
        if residual == "preln":
            continue
        out = {f: model_grads(cfg_of(residual, dict(mgt, fused=f)), dev, tokens) for f in (True, False)}
        err_out = max_rel(out[True][0], out[False][0])
        err_grad = max(max_rel(g, out[False][1][n]) for n, g in out[True][1].items())
        rows.append({"check": "fused = reference (fp32)", "form": name, "ok": err_out <= 1e-6 and err_grad <= 1e-5,
                     "detail": f"output {err_out:.1e}, gradients {err_grad:.1e}"})
    return rows


def check_compile(dev) -> list[dict]:
    """Compiled blocks (inductor: Triton on a GPU) against the reference op by op, fp32, as
    tests/unit/test_compile.py holds them on the CPU: outputs and the whole gradient 1e-6 normwise."""
    tokens = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(5)).to(dev)
    residual, mgt = FORMS["mgt full"]
    out_c, g_c = model_grads(cfg_of(residual, mgt), dev, tokens, compiled=True)
    out_r, g_r = model_grads(cfg_of(residual, dict(mgt, fused=False)), dev, tokens)
    flat = lambda g: torch.cat([g[n].reshape(-1).double() for n in sorted(g)])  # noqa: E731
    norm = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    err_out, err_grad = norm(out_c, out_r), norm(flat(g_c), flat(g_r))
    return [{"check": "compile = reference (fp32)", "form": "mgt full", "ok": err_out <= 1e-6 and err_grad <= 1e-6,
             "detail": f"output {err_out:.1e}, gradient {err_grad:.1e} (normwise)"}]


def check_recompute(dev) -> list[dict]:
    """Activation checkpointing (one block per segment) changes no fp32 gradient beyond rounding."""
    rows = []
    tokens = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(6)).to(dev)
    for name in ("preln", "mgt full"):
        residual, mgt = FORMS[name]
        cfg = cfg_of(residual, mgt, layers=4)
        (o0, g0), (o1, g1) = model_grads(cfg, dev, tokens, 0), model_grads(cfg, dev, tokens, 1)
        err = max(max_rel(g1[n], g0[n]) for n in g0)
        rows.append({"check": "checkpointing keeps gradients (fp32)", "form": name,
                     "ok": torch.equal(o0, o1) and err <= 1e-6, "detail": f"gradients {err:.1e}"})
    return rows


def train_losses(cfg: ModelConfig, dev, dtype, steps: int) -> list[float]:
    """AdamW on a fixed copy-task batch (second half repeats the first), the model in `dtype`."""
    g = torch.Generator().manual_seed(7)
    half = torch.randint(0, cfg.vocab_size, (8, 32), generator=g)
    x = torch.cat([half, half], dim=1).to(dev)
    model = build_model(cfg, seed=3, device=dev, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def check_bf16_training(dev, steps: int) -> list[dict]:
    """bf16 training (pure bf16, no fp32 master weights): finite, the loss at least halves, and over the
    last 5 steps it stays within 5 % of the starting loss from the fp32 run's (memorising one batch drives
    both towards 0, so a gap relative to the final loss would mean nothing)."""
    rows = []
    for name in ("preln", "mgt full", "mgt r=4 token beta"):
        residual, mgt = FORMS[name]
        cfg = cfg_of(residual, mgt, layers=4)
        bf, fp = train_losses(cfg, dev, torch.bfloat16, steps), train_losses(cfg, dev, torch.float32, steps)
        finite = all(l == l and abs(l) != float("inf") for l in bf)
        gap = max(abs(b - f) for b, f in zip(bf[-5:], fp[-5:])) / fp[0]
        rows.append({"check": "bf16 trains like fp32", "form": name,
                     "ok": finite and bf[-1] < 0.5 * bf[0] and gap < 0.05,
                     "detail": f"loss {bf[0]:.3f} -> {bf[-1]:.3f} (fp32 {fp[-1]:.3f}), last-5 gap {gap:.1%} of the start"})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-steps", type=int, default=60)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":  # fp32 comparisons in true fp32, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    else:
        print(f"# {dev}, torch {torch.__version__}", flush=True)
    rows = []
    for check in (check_init, check_fused, check_compile, check_recompute,
                  lambda d: check_bf16_training(d, args.train_steps)):
        tic = time.perf_counter()
        try:
            got = check(dev)
        except Exception as e:  # one failing check must not hide the others
            got = [{"check": getattr(check, "__name__", "bf16 training"), "form": "-", "ok": False,
                    "detail": f"{type(e).__name__}: {e}"}]
        for r in got:
            r["seconds"] = round(time.perf_counter() - tic, 2)
            print(json.dumps(r), flush=True)
        rows += got
    print("\n| check | form | ok | detail |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['form']} | {'yes' if r['ok'] else 'NO'} | {r['detail']} |")
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} checks passed on {dev}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
