# lm-evaluation-harness on an exported transformers directory, in this process: the `mgt_text` task of
# tasks/ (perplexity of local text files), what `mgt eval` (mgt_scale/commands/eval.py) reports.
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

TASKS = Path(__file__).resolve().parent / "tasks"


def run_lm_eval(model_dir: Path, files: list[str], batch_size: int = 1) -> dict:
    """lm-eval's `mgt_text` metrics for the transformers directory `model_dir` (lm_eval.simple_evaluate,
    the call behind `lm_eval --model hf ... --include_path mgt_scale/hf/tasks`)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    args = {"pretrained": str(model_dir), "trust_remote_code": True, "dtype": "float32"}
    tm = TaskManager(include_path=str(TASKS), metadata={**args, "text_file": files})
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval's progress and tables: keep stdout ours
        out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["mgt_text"], task_manager=tm,
                                      batch_size=batch_size, device="cpu")
    res = out["results"]["mgt_text"]
    return {k.split(",")[0]: v for k, v in res.items() if k.endswith(",none")}
