# The training engines: one interface (`Engine`, mgt_scale/engine/base.py) over DeepSpeed's ZeRO engine
# (`parallel.mode: zero`, stages 1-3; zero.py) and its pipeline engine (`parallel.mode: pipeline`;
# pipeline.py). `build_engine` picks one from the config; callers use only the interface.
from __future__ import annotations

from typing import Optional

from mgt_scale.config import Config
from mgt_scale.engine.base import Batch, Engine, StepResult
from mgt_scale.parallel.topology import BatchPlan

__all__ = ["Batch", "Engine", "StepResult", "build_engine"]


def build_engine(cfg: Config, plan: BatchPlan, precision: str, ds_config: Optional[dict] = None) -> Engine:
    """The engine of `cfg.parallel.mode` (needs torch.distributed initialised for more than one rank).
    `ds_config`: the DeepSpeed JSON (`mgt train` passes the one it validated and --dry-run prints);
    None: `deepspeed_config(cfg, plan, precision)` for this process, as tests and benchmarks want."""
    if cfg.parallel.mode == "pipeline":
        from mgt_scale.engine.pipeline import PipelineEngine
        return PipelineEngine(cfg, plan, precision, ds_config)
    from mgt_scale.engine.zero import ZeroEngine
    return ZeroEngine(cfg, plan, precision, ds_config)
