# The fused CPU kernel of the MGT residual update (csrc/mgt_update_cpu.cpp): built on first use with
# torch.utils.cpp_extension (about 45 s on 2 cores; cached per python and torch version under
# TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, in mgt_scale/), wrapped in an autograd Function.
# Used by ResidualOp when `mgt.cpu_kernel` is on and the input is fp32 on an AVX2 CPU; anything else
# (GPU, bf16, no compiler) takes the torch-op path, with one warning if the build fails.
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

_SOURCE = Path(__file__).resolve().parent / "csrc" / "mgt_update_cpu.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
_lock = threading.Lock()
_state: dict = {}  # "module": the loaded extension, or "error": why it is unavailable


def cpu_supports_kernel() -> bool:
    """The kernel is AVX2 + FMA code: every CPU that torch runs at AVX2 or AVX512 capability has both."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_directory() -> Path:
    from torch.utils.cpp_extension import get_default_build_root
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return Path(get_default_build_root()) / "mgt_scale" / tag / "mgt_update_cpu"


def _build(verbose: bool):
    """Compile (or load the cached build) under an flock, which the OS releases if the holder dies. Ranks
    starting together take turns: one compiles, the others load its result. torch's own lock file
    ('lock', left behind by a process killed mid-build, after which torch waits on it forever) is removed
    while the flock is held, when no one else can be building."""
    from torch.utils.cpp_extension import load as cpp_load
    if shutil.which("ninja") is None:  # the pip package `ninja` (a DeepSpeed dependency) sits beside python
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    d = build_directory()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "mgt_scale.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (d / "lock").unlink(missing_ok=True)
        return cpp_load(name="mgt_update_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                        extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=verbose)


def load(verbose: bool = False):
    """The compiled extension, or None (with the reason in `unavailable_reason()`); built once per process."""
    if "module" in _state:  # every forward asks: no lock once built
        return _state["module"]
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        if not cpu_supports_kernel():
            _state["error"] = f"CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX2)"
            return None
        try:
            _state["module"] = _build(verbose)
        except Exception as exc:  # no compiler, no headers, read-only cache: fall back, say so once
            _state["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"mgt.cpu_kernel: the fused CPU kernel could not be built ({_state['error']}); "
                          "using the torch-op path", RuntimeWarning, stacklevel=2)
        return _state.get("module")


def unavailable_reason() -> Optional[str]:
    return _state.get("error")


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel can run on this input (builds the kernel on the first call that could)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[-1] % 8:
        return False
    if torch.compiler.is_compiling():
        return False
    return load() is not None


def _rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[..., n] -> [M, n] without a copy where strides allow; the kernel needs unit column stride."""
    if t is None:
        return None
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _FusedUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, g_pre, ln_w, ln_b, z, z_bias, alpha, ln_eps, lam, eps):
        ext = _state["module"]
        shape = x.shape
        x2, f2, g2, z2 = _rows(x), _rows(f), _rows(g_pre), _rows(z)
        out, mean, rstd, gate, e = ext.forward(x2, f2, g2, ln_w, ln_b, ln_eps, z2, z_bias, alpha, lam, eps)
        ctx.save_for_backward(x2, f2, g2, ln_w, ln_b, z2, z_bias, alpha, mean, rstd, gate, e)
        ctx.consts = (ln_eps, lam, eps)
        ctx.shapes = (shape, None if g_pre is None else g_pre.shape, None if z is None else z.shape)
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2, f2, g2, ln_w, ln_b, z2, z_bias, alpha, mean, rstd, gate_saved, e_saved = ctx.saved_tensors
        ln_eps, lam, eps = ctx.consts
        shape, g_shape, z_shape = ctx.shapes
        dx, df, dg, dw, db, dz, dzb, dal = _state["module"].backward(
            _rows(grad_out), x2, f2, g2, ln_w, ln_b, ln_eps, z2, z_bias, alpha, lam, eps, mean, rstd,
            gate_saved, e_saved)
        gate, beta = g2 is not None, z2 is not None
        return (dx.view(shape), df.view(shape),
                dg.view(g_shape) if gate else None, dw if gate else None, db if gate else None,
                dz.view(z_shape) if beta else None, dzb if beta else None, dal.view_as(alpha) if beta else None,
                None, None, None)


def fused_update(x: torch.Tensor, f: torch.Tensor, g_pre: Optional[torch.Tensor], ln: Optional[torch.nn.LayerNorm],
                 z: Optional[torch.Tensor], z_bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
                 lam: float, eps: float) -> torch.Tensor:
    """X + beta (V - alpha X), V = F * sigmoid(LN(g_pre)) (F without a gate), beta = lam tanh(z + z_bias) + eps
    (no beta: X + V); z is [..., 1] (one beta per token) or [..., d]. Call only when `usable(x)`."""
    ln_w = ln_b = None
    ln_eps = 1e-5
    if g_pre is not None:
        ln_w, ln_b, ln_eps = ln.weight, ln.bias, ln.eps
    return _FusedUpdate.apply(x, f, g_pre, ln_w, ln_b, z, z_bias, alpha, float(ln_eps), float(lam), float(eps))
