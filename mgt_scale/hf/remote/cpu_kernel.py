# cpu_kernel.py of a Hugging Face export: a stand-in for mgt-scale's C++ CPU kernel, which the export
# does not carry. `usable` is always False, so residual.py runs the MGT update as torch ops (the fused
# path, the same values to rounding: mgt-scale's tests hold both to the reference formulas).
from __future__ import annotations


def usable(x) -> bool:
    return False


def fused_update(*args, **kwargs):
    raise RuntimeError("the mgt-scale C++ CPU kernel is not part of a Hugging Face export")
