# Test-only: installs the fault hooks of mgt_fault_hooks.py in a Python process started with tests/fault_hooks on
# PYTHONPATH (tests/distributed/helpers.py and the unit tests that start `mgt train` with MGT_FAULT_*).
# Nothing is imported up front: an import hook patches the modules of mgt_fault_hooks.TARGETS when the
# process imports them, so processes that never train (the deepspeed launcher) pay nothing.
# Python imports one `sitecustomize` module, the first on sys.path: this one shadows the interpreter's own
# (Debian's /etc/python3.11/sitecustomize.py installs apport's exception hook), so that one is run too.
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _chain_shadowed() -> None:
    """Run the next sitecustomize on sys.path (the one this file shadows), if any."""
    for d in sys.path:
        if not d or os.path.abspath(d) == _HERE:
            continue
        path = os.path.join(d, "sitecustomize.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", path)
            try:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            except Exception:  # as site.py does: a broken sitecustomize must not stop the interpreter
                pass
            return


class _PatchOnImport(importlib.abc.MetaPathFinder):
    TARGETS = ("mgt_scale.train.trainer", "mgt_scale.checkpoint.manager", "mgt_scale.checkpoint.writer",
               "mgt_scale.train.resume_callbacks", "mgt_scale.engine.zero", "mgt_scale.parallel.pipeline")

    def find_spec(self, name, path=None, target=None):
        if name not in self.TARGETS:
            return None
        for finder in sys.meta_path:  # the spec the other finders give, with a loader that patches after
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def patched(module, exec_module=exec_module, name=name):
                    exec_module(module)
                    if _HERE not in sys.path:
                        sys.path.append(_HERE)
                    import mgt_fault_hooks
                    mgt_fault_hooks.patch_module(name, module)

                spec.loader.exec_module = patched
                return spec
        return None


_chain_shadowed()
sys.meta_path.insert(0, _PatchOnImport())
