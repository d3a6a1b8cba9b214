# Rank-aware logging for every mgt-scale process. Diagnostics go through `logging` (never `print`), so an
# operator can raise or silence them and a cluster log names the rank that wrote each line:
#   - rank 0 logs at INFO by default; other ranks log WARNING and above only, unless every rank is asked
#     for (`MGT_LOG_ALL_RANKS=1`), in which case they log at the same level as rank 0;
#   - the level comes from `MGT_LOG_LEVEL` (DEBUG, INFO, WARNING, ERROR; default INFO);
#   - in a world of more than one rank each line starts with `[rank N]`; a single process keeps plain
#     lines, so the console output of `mgt train` on one machine reads as before;
#   - INFO and DEBUG go to stdout, WARNING and above to stderr (`warning: ...` / `error: ...` prefixes).
# A command's product (the table of `mgt ckpt list`, the JSON of `--dry-run`) is output, not logging: it
# stays a print to stdout.
from __future__ import annotations

import logging
import os
import sys

ROOT = "mgt_scale"
LEVEL_ENV = "MGT_LOG_LEVEL"
ALL_RANKS_ENV = "MGT_LOG_ALL_RANKS"


def get_logger(name: str) -> logging.Logger:
    """The logger of one module (`get_logger(__name__)`); all of them hang under `mgt_scale`. The first
    call configures logging from the environment when nothing has yet (library use, tests in-process)."""
    if not logging.getLogger(ROOT).handlers:
        setup_logging()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def _env_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def process_rank() -> int:
    """This process's global rank as the launcher's environment gives it (0 outside a launcher)."""
    return _env_rank()


def _env_world() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


class _Format(logging.Formatter):
    """`[rank N] ` in a multi-rank world; `warning: ` / `error: ` before messages of those levels."""

    def __init__(self, rank: int, world: int):
        super().__init__("%(message)s")
        self.prefix = f"[rank {rank}] " if world > 1 else ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            text = "error: " + text
        elif record.levelno >= logging.WARNING:
            text = "warning: " + text
        return self.prefix + text


class _StdStream(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr looked up at each record, not bound once: a stream replaced
    later (pytest's capture, a redirect in a tool) still receives the lines."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "WARN": logging.WARNING,
           "ERROR": logging.ERROR}


def parse_level(value: str | None) -> int:
    """A level name of MGT_LOG_LEVEL; an unknown name is an error that names the variable. Only DEBUG,
    INFO, WARNING (alias WARN) and ERROR: a level above ERROR (CRITICAL, FATAL) would drop the error line
    that explains a failed command or a crash, and NOTSET is not a threshold an operator means."""
    name = (value or "INFO").strip().upper()
    if name not in _LEVELS:
        raise ValueError(f"{LEVEL_ENV}={value!r}: not a log level (DEBUG, INFO, WARNING, ERROR)")
    return _LEVELS[name]


def lines_name_the_rank() -> bool:
    """Whether this process's log lines already start with `[rank N]` (set up for a world of more than
    one rank): a message then need not name its rank again."""
    return any(isinstance(h.formatter, _Format) and h.formatter.prefix for h in logging.getLogger(ROOT).handlers)


def setup_logging(rank: int | None = None, world: int | None = None, level: str | int | None = None,
                  all_ranks: bool | None = None) -> logging.Logger:
    """Configure the `mgt_scale` logger for this process (idempotent: a second call replaces the
    handlers, e.g. once the rank is known). Arguments left None come from the environment."""
    rank = _env_rank() if rank is None else rank
    world = _env_world() if world is None else world
    lvl = level if isinstance(level, int) else parse_level(level if level is not None else os.environ.get(LEVEL_ENV))
    if all_ranks is None:
        all_ranks = os.environ.get(ALL_RANKS_ENV, "") not in ("", "0", "false", "no")
    if rank != 0 and not all_ranks:
        lvl = max(lvl, logging.WARNING)
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    fmt = _Format(rank, world)
    out = _StdStream("stdout")
    out.addFilter(_Below(logging.WARNING))
    err = _StdStream("stderr")
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(lvl)
    logger.propagate = False
    return logger
