# The one guard for every change mgt-scale makes to DeepSpeed's code: the ZeRO-3 optimizer fixes
# (mgt_scale/parallel/ds_zero3_fixes.py), the pipeline engine's clipping over all stages and its
# non-finite step skip (mgt_scale/engine/pipeline.py), and the pipeline partition given by FLOPs
# (mgt_scale/parallel/pipeline.py). A patch is installed only when
#   - its group's off switch (an environment variable) is not "0", and
#   - the source of every DeepSpeed function it replaces or relies on has the sha256 recorded here, the
#     one of DeepSpeed CHECKED_VERSION, the version pyproject.toml pins and the tests ran against;
# otherwise DeepSpeed's own code runs. The start-up line (`describe`) names the patches in place and
# says why any other is not, so that a DeepSpeed upgrade cannot drop a patch unseen.
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import textwrap
from dataclasses import dataclass
from typing import Optional

CHECKED_VERSION = "0.19.8"

_STAGE3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"
_ENGINE = "deepspeed.runtime.engine:DeepSpeedEngine"
_PIPE_MODULE = "deepspeed.runtime.pipe.module:PipelineModule"


@dataclass(frozen=True)
class Patch:
    name: str
    group: str  # "zero3" or "pipeline": one start-up line and one off switch per group
    functions: tuple  # "module:Class.attribute" of the DeepSpeed code it replaces or relies on
    sha256: str  # of those functions' dedented sources joined by "\n", in DeepSpeed CHECKED_VERSION


SWITCHES = {"zero3": "MGT_DS_ZERO3_FIXES", "pipeline": "MGT_DS_PIPELINE_FIXES",
            "partition": "MGT_DS_GIVEN_PARTITION"}
LABELS = {"zero3": "ZeRO-3 optimizer fixes", "pipeline": "pipeline engine fixes",
          "partition": "pipeline partition by FLOPs"}

PATCHES = {p.name: p for p in (
    # ds_zero3_fixes: the method it wraps (and whose defective device comparison it works around)
    Patch("fp32-master-reuse", "zero3", (f"{_STAGE3}._create_fp32_partitions",),
          "867e41591b0a1c57d21f28138a144117d291f35a660b3dd0778ec80b26e2b861"),
    # ds_zero3_fixes: the method it replaces, whose every step but the copy it repeats
    Patch("gradient-view", "zero3", (f"{_STAGE3}._prepare_fp32_grad_for_sub_group",),
          "44d0f71378ee31203be8a31ee00394efae995307a4abc8d512755c2aa6bfe1bd"),
    # engine.pipeline: replaces clip_fp32_gradients, which _take_model_step calls for fp32 ZeRO-0 runs
    Patch("pipeline-clip-all-stages", "pipeline", (f"{_ENGINE}.clip_fp32_gradients", f"{_ENGINE}._take_model_step"),
          "866f221af66d79f63156f6139be00eb2e02b648370496c9bcc3058f2014ada11"),
    # engine.pipeline: wraps optimizer.step; _take_model_step reads optimizer.overflow after it
    Patch("pipeline-nonfinite-skip", "pipeline", (f"{_ENGINE}._take_model_step",),
          "b5e1145cf37b0f2a7e131ec0d9cd40c89f6caaf6444a1969e7caa8f523413ae4"),
    # pipeline.GivenPartitionModule: replaces _partition_layers, which __init__ calls once to set `parts`
    # and this stage's bounds (_set_bounds); a refusal falls back to DeepSpeed's "parameters" partition
    Patch("pipeline-given-partition", "partition",
          (f"{_PIPE_MODULE}.__init__", f"{_PIPE_MODULE}._partition_layers", f"{_PIPE_MODULE}._set_bounds"),
          "9e0a57f1a8b476a2a9114c780b0acfbf691bd96605ebf6b458211a2a7d05f24c"),
)}


def _resolve(qualified: str):
    module, attribute = qualified.split(":")
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def source_sha256(functions) -> str:
    """sha256 of the functions' dedented sources joined by newlines; "" where one cannot be found or read
    (an install without .py files, a renamed method): no patch then."""
    try:
        sources = [textwrap.dedent(inspect.getsource(_resolve(f))) for f in functions]
    except (AttributeError, ImportError, OSError, TypeError):
        return ""
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()


def refusal(name: str) -> Optional[str]:
    """None when patch `name` may be installed; otherwise why not, for the start-up line."""
    patch = PATCHES[name]
    switch = SWITCHES[patch.group]
    if os.environ.get(switch, "1").strip() == "0":
        return f"off ({switch}=0)"
    if source_sha256(patch.functions) != patch.sha256:
        import deepspeed
        names = ", ".join(f.split(":")[1] for f in patch.functions)
        return f"DeepSpeed {deepspeed.__version__}: {names} not the source checked (DeepSpeed {CHECKED_VERSION}'s)"
    return None


def guard(name: str) -> bool:
    """Whether patch `name` may be installed now (the installer then installs it)."""
    return refusal(name) is None


def describe(group: str) -> str:
    """One start-up log line for a group: the patches in place, and each one not installed with why."""
    names = [n for n, p in PATCHES.items() if p.group == group]
    why = {n: refusal(n) for n in names}
    switch = SWITCHES[group]
    if all(w == f"off ({switch}=0)" for w in why.values()):
        return f"{LABELS[group]}: off ({switch}=0)"
    active = [n for n in names if why[n] is None]
    refused = "; ".join(f"{n} NOT installed ({why[n]})" for n in names if why[n] is not None)
    return f"{LABELS[group]}: " + "; ".join(part for part in (", ".join(active) or "none", refused) if part)
