# The `mgt` command: dispatches subcommands to the package that owns them, importing lazily so
# `mgt --help` and light commands stay fast. `mgt --version` prints the installed package's version.
# Output cut short by a closed pipe (`mgt ckpt list RUN | head -1`) ends quietly with exit 141 (128 +
# SIGPIPE, what the shell reports for a command killed by it), not a BrokenPipeError traceback.
from __future__ import annotations

import importlib
import os
import sys

from mgt_scale.exit_codes import CONFIG_ERROR
from mgt_scale.logs import get_logger, setup_logging

BROKEN_PIPE = 141

COMMANDS = {
    "train": ("mgt_scale.train.entry", "train a model (zero3 or pipeline) from a YAML config"),
    "prep": ("mgt_scale.data.prep", "train a SentencePiece tokenizer and write token shards; --verify DIR"),
    "probe": ("mgt_scale.commands.probe", "per-layer geometry of a fresh or checkpointed model"),
    "report": ("mgt_scale.monitor.report", "PNG figures and a markdown summary of a run directory"),
    "slurm": ("mgt_scale.cluster.slurm", "render / submit sbatch jobs with preemption, requeue and resume"),
    "ckpt": ("mgt_scale.commands.ckpt", "checkpoint tools: list, verify, reshard"),
    "export": ("mgt_scale.commands.export", "consolidated safetensors export of a checkpoint"),
    "generate": ("mgt_scale.commands.generate", "sample a continuation from an exported model"),
    "eval": ("mgt_scale.commands.eval", "perplexity on text files through lm-evaluation-harness"),
    "experiment": ("mgt_scale.experiments.runner", "run a sweep of training runs and collect results"),
}


def usage() -> str:
    lines = ["usage: mgt COMMAND [ARGS ...] | mgt --version", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`mgt COMMAND --help` describes each command."]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version("mgt-scale")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run one command; a reader that closed the pipe ends it quietly (the Python docs' recipe for
    SIGPIPE, docs.python.org/3/library/signal.html#note-on-sigpipe): stdout is pointed at devnull so
    the interpreter's final flush cannot raise again."""
    try:
        setup_logging()
    except ValueError as e:  # MGT_LOG_LEVEL names no level: bad input, before any command runs
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR
    try:
        try:
            code = _dispatch(argv)
        except SystemExit:  # argparse's --help and usage errors exit from inside the command
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # inside the try: buffered output meets the closed pipe here
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V"):
        print(f"mgt {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        get_logger(__name__).error(f"unknown command {name!r}\n\n{usage()}")
        return CONFIG_ERROR
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
