# The `mgt` command: dispatches subcommands to the package that owns them, importing lazily so
# `mgt --help` and light commands stay fast.
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("mgt_scale.train.entry", "train a model (zero3 or pipeline) from a YAML config"),
    "prep": ("mgt_scale.data.prep", "train a SentencePiece tokenizer and write token shards; --verify DIR"),
    "probe": ("mgt_scale.monitor.probe_cli", "per-layer geometry of a fresh or checkpointed model"),
    "report": ("mgt_scale.monitor.report", "PNG figures and a markdown summary of a run directory"),
    "slurm": ("mgt_scale.cluster.slurm", "render / submit sbatch jobs with preemption, requeue and resume"),
    "ckpt": ("mgt_scale.train.ckpt_cli", "checkpoint tools: list, verify, reshard"),
    "export": ("mgt_scale.train.export", "consolidated safetensors export of a checkpoint"),
    "generate": ("mgt_scale.train.generate", "sample a continuation from an exported model"),
    "experiment": ("mgt_scale.experiments.runner", "run a sweep of training runs and collect results"),
}


def usage() -> str:
    lines = ["usage: mgt COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`mgt COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
