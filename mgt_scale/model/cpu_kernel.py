# The fused CPU kernel of the MGT residual update (csrc/mgt_update_cpu.cpp): built on first use with
# torch.utils.cpp_extension (about 45 s on 2 cores; cached per installation under $TORCH_EXTENSIONS_DIR
# or ~/.cache/torch_extensions, in mgt_scale/), always with the interpreter's own ninja, wrapped together
# with the gate and beta projections in one autograd Function.
# Used by ResidualOp when `mgt.cpu_kernel` is on and the input is fp32 on an AVX2 CPU; anything else
# (GPU, bf16, no compiler) takes the torch-op path, with one warning if the build fails.
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
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
    """One build directory per installation: python and torch version, plus a hash of what the build
    commands name (this source file, torch's and python's include directories, the flags).

    Two installations sharing one directory (two checkouts or virtual environments under one home
    directory: CI's fresh-copy README tests, two jobs on a cluster) would each find the other's build
    commands there and rebuild the kernel in turn, about 25 s each time, their ranks waiting on the lock.
    In a CI run that overlapped another checkout's tests this way, the uninterrupted run of a bit-exact
    resumption test logged one loss one ulp off: the torch-op path's loss to the last bit. Which step of
    the rebuild race made that run take the torch-op path was not found."""
    import hashlib
    import sysconfig

    named = [str(_SOURCE), str(Path(torch.__file__).resolve().parent), sysconfig.get_paths()["include"], *_FLAGS]
    digest = hashlib.sha256("\0".join(named).encode()).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}_{digest}"
    return _build_root() / "mgt_scale" / tag / "mgt_update_cpu"


def _build_root() -> Path:
    """$TORCH_EXTENSIONS_DIR when set (as for torch's own extensions), else torch's default cache root."""
    from torch.utils.cpp_extension import get_default_build_root
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def interpreter_ninja() -> Optional[Path]:
    """The ninja of this interpreter's installation: the one beside sys.executable (where the pip package
    `ninja`, a DeepSpeed dependency, puts it in a virtual environment), else the one `python -m ninja`
    runs (the package's BIN_DIR); None when neither exists (then PATH's ninja, if any, builds).

    Not whichever ninja comes first on PATH: srun ranks, an activated venv and `.venv/bin/python` see
    different PATHs, and two ninja versions disagree about the build log (.ninja_log) in the build
    directory, so each switch between them rebuilt the whole kernel, 30-60 s, without a word."""
    candidates = [Path(sys.executable).parent / "ninja"]
    try:
        import ninja  # the pip package
        if getattr(ninja, "BIN_DIR", ""):
            candidates.append(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        pass
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


@contextlib.contextmanager
def _ninja_first_on_path():
    """torch.utils.cpp_extension runs `ninja` by name, through os.environ's PATH (is_ninja_available, and
    _run_ninja_build's env=os.environ.copy()): for the build only, put the interpreter's ninja's directory
    first, and restore PATH after. (Only the building thread runs meanwhile, under the module lock.)"""
    ninja = interpreter_ninja()
    if ninja is None:
        yield
        return
    saved = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(ninja.parent)] + ([saved] if saved else []))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


def _build(verbose: bool):
    """Compile (or load the cached build) under an flock, which the OS releases if the holder dies. Ranks
    starting together take turns: one compiles, the others load its result. torch's own lock file
    ('lock', left behind by a process killed mid-build, after which torch waits on it forever) is removed
    while the flock is held, when no one else can be building. A process that compiles says so on
    stderr, before (the build takes about 45 s, in which a rank otherwise prints nothing) and after."""
    from torch.utils.cpp_extension import load as cpp_load
    d = build_directory()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "mgt_scale.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (d / "lock").unlink(missing_ok=True)
        before = _built_at(d)
        if before is None or before < _SOURCE.stat().st_mtime:
            print(f"compiling the MGT C++ kernel (first use, ~45 s) in {d}", file=sys.stderr, flush=True)
        start = time.monotonic()
        with _ninja_first_on_path():
            module = cpp_load(name="mgt_update_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                              extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=verbose)
        if _built_at(d) != before:
            print(f"compiled the MGT C++ kernel in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        return module


def _built_at(d: Path) -> Optional[float]:
    """The modification time of the built extension in `d`, None when there is none yet."""
    try:
        return (d / "mgt_update_cpu.so").stat().st_mtime
    except OSError:
        return None


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


def describe(residual: str, fused: bool, kernel_on: bool, d_model: int, device_type: str, precision: str) -> str:
    """One start-up log line: which path the MGT residual update takes in this process. Where the kernel
    would serve, it is loaded (built) now, so the line is the truth, and the kernel and torch-op paths,
    which agree to about an ulp but not to the bit, are never mixed up unseen (bit-exact resumption on
    CPUs needs the same path before and after)."""
    if residual not in ("mgt", "mhc_gate", "ddl"):
        return f"mgt.cpu_kernel: not used (residual {residual})"
    if not (fused and kernel_on):
        return "mgt.cpu_kernel: off (torch-op path)"
    if not _takes(device_type, torch.float32 if precision == "fp32" else None, d_model):
        return f"mgt.cpu_kernel: not used ({device_type}, {precision}, d_model {d_model}; torch-op path)"
    if load() is None:
        return f"mgt.cpu_kernel: UNAVAILABLE, torch-op path ({unavailable_reason()})"
    return "mgt.cpu_kernel: in use"


def _takes(device_type: str, dtype, width: int) -> bool:
    """The inputs the kernel is written for: fp32 rows on the CPU, width a multiple of 8 (AVX2 lanes)."""
    return device_type == "cpu" and dtype == torch.float32 and width % 8 == 0


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel can run on this input (builds the kernel on the first call that could)."""
    if not _takes(x.device.type, x.dtype, x.shape[-1]):
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


def _gate_and_beta(gz: torch.Tensor, gate_rows: int):
    """Column ranges of the projection output [g | z]: the gate pre-activation and z (None where absent)."""
    return (gz[:, :gate_rows] if gate_rows else None), (gz[:, gate_rows:] if gz.shape[1] > gate_rows else None)


class _FusedUpdate(torch.autograd.Function):
    """The sublayer's MGT update from its projections on: gz = [X W_gate^T | X W_beta^T] (through the rank-r
    factor h = X W_down^T when low rank) as one matmul, then the kernel on column ranges of gz. Written as
    one Function so that the backward can use the kernel's single [dg | dz] buffer: one matmul for the
    projection's weight gradient and one addmm that adds its input gradient to the kernel's dx, where
    autograd would slice the weight, run a matmul per part, concatenate and sum (bench/RESULTS.md)."""

    @staticmethod
    def forward(ctx, x, f, w_down, w_proj, ln_w, ln_b, z_bias, alpha, gate_rows, ln_eps, lam, eps):
        ext = _state["module"]
        shape = x.shape
        x2, f2 = _rows(x), _rows(f)
        h = x2 if w_down is None else torch.mm(x2, w_down.t())
        gz = torch.mm(h, w_proj.t())
        g, z = _gate_and_beta(gz, gate_rows)
        out, mean, rstd, gate, e = ext.forward(x2, f2, g, ln_w, ln_b, ln_eps, z, z_bias, alpha, lam, eps)
        ctx.save_for_backward(x2, f2, h, gz, w_down, w_proj, ln_w, ln_b, z_bias, alpha, mean, rstd, gate, e)
        ctx.consts = (gate_rows, ln_eps, lam, eps)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2, f2, h, gz, w_down, w_proj, ln_w, ln_b, z_bias, alpha, mean, rstd, gate, e = ctx.saved_tensors
        gate_rows, ln_eps, lam, eps = ctx.consts
        g, z = _gate_and_beta(gz, gate_rows)
        dx, df, dgz, dw, db, dzb, dal = _state["module"].backward(
            _rows(grad_out), x2, f2, g, ln_w, ln_b, ln_eps, z, z_bias, alpha, lam, eps, mean, rstd, gate, e)
        d_proj = torch.mm(dgz.t(), h)
        if w_down is None:
            d_down = None
            dx.addmm_(dgz, w_proj)  # dx is the kernel's own fresh tensor
        else:
            dh = torch.mm(dgz, w_proj)
            d_down = torch.mm(dh.t(), x2)
            dx.addmm_(dh, w_down)
        shape = ctx.shape
        return (dx.view(shape), df.view(shape), d_down, d_proj,
                dw if g is not None else None, db if g is not None else None,
                dzb if z is not None else None, dal.view_as(alpha) if z is not None else None,
                None, None, None, None)


def fused_update(x: torch.Tensor, f: torch.Tensor, w_down: Optional[torch.Tensor], w_proj: torch.Tensor,
                 ln_w: Optional[torch.Tensor], ln_b: Optional[torch.Tensor], ln_eps: float,
                 z_bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor], gate_rows: int, lam: float,
                 eps: float) -> torch.Tensor:
    """X + beta (V - alpha X) with V = F * sigmoid(LN(g)) (F without a gate) and beta = lam tanh(z + z_bias) + eps
    (no beta: X + V), where [g | z] = X W_proj^T, or (X W_down^T) W_proj^T with `w_down`: rows [0, gate_rows)
    of W_proj give the gate, the rest (1 per token or d per channel, or none) beta; LN(g) has weight `ln_w`,
    bias `ln_b` and epsilon `ln_eps` (ignored without a gate). Call only when `usable(x)`."""
    return _FusedUpdate.apply(x, f, w_down, w_proj, ln_w, ln_b, z_bias, alpha, int(gate_rows), float(ln_eps),
                              float(lam), float(eps))
