# The last word of a run that raised: the traceback on stderr, then one `error:` line, status.json
# `failed` with the exit code and a one-line cause (rank 0), and the exit code: exit_codes.NO_SPACE
# when the disk (or quota) is full, which retrying cannot fix, else exit_codes.CRASH (retried a
# bounded number of times by the SLURM job script). torch.save reports a failed write as a
# RuntimeError without the errno ("unexpected pos 704 vs 598", "basic_ios::clear: iostream error",
# "PytorchStreamWriter failed writing file ..."), and DeepSpeed passes it on: for those the filesystem
# itself is asked whether it is full.
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from mgt_scale import exit_codes
from mgt_scale.logs import get_logger

log = get_logger(__name__)
STATUS_FILE = "status.json"  # a run directory's state (running, finished, stopped, failed) and exit code

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded")
TORCH_WRITE_FAILED = ("pytorchstreamwriter failed", "file write failed", "unexpected pos", "iostream error")
NEARLY_FULL = 64 << 20  # bytes free below which a failed write is taken for a full disk
PROBE = 1 << 20  # bytes written to ask a filesystem with room left whether a quota is spent
INTERRUPTED = 130  # Ctrl-C (KeyboardInterrupt), as a shell reports it: a crash to the job script


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from or while handling (`__cause__`, `__context__`)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


@contextmanager
def writing(path: str | Path):
    """Records `path` on an exception raised inside (unless one is recorded already), so that a
    failed write that names no file (an OSError from write(), torch's RuntimeError) still says where."""
    try:
        yield
    except BaseException as e:
        if getattr(e, "mgt_path", None) is None:
            try:
                e.mgt_path = str(path)
            except AttributeError:  # exceptions without a __dict__
                pass
        raise


def failed_path(exc: BaseException) -> Optional[str]:
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
        if getattr(e, "mgt_path", None):
            return e.mgt_path
    return None


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _filesystem_full(where: Path) -> bool:
    """Whether a write into directory `where` fails for want of space: little free space, or a small
    probe file that the filesystem refuses with ENOSPC/EDQUOT (a quota does not show in statvfs)."""
    try:
        if shutil.disk_usage(where).free < NEARLY_FULL:
            return True
    except OSError:
        return False
    probe = where / f".mgt_space_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return e.errno in NO_SPACE_ERRNOS
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def no_space_message(exc: BaseException, fallback: Path,
                     then: str = "resume with --resume auto") -> Optional[str]:
    """The `error:` line for a run that ran out of disk space or quota, or None if `exc` is not that.
    It names the path being written (`fallback`, the run directory, when the exception does not say)
    and the free space on its filesystem; `then`: what to do once space is freed."""
    chain = list(exception_chain(exc))
    texts = [str(e).lower() for e in chain]
    path = Path(failed_path(exc) or fallback)
    where = _existing(path if path.is_dir() else path.parent)
    sure = any(isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS for e in chain) \
        or any(t in text for t in NO_SPACE_TEXT for text in texts)
    if not sure and not (any(t in text for t in TORCH_WRITE_FAILED for text in texts) and _filesystem_full(where)):
        return None
    try:
        usage = shutil.disk_usage(where)
        space = f"{_gib(usage.free)} free of {_gib(usage.total)} on the filesystem of {where}"
    except OSError as e:
        space = f"free space of {where} unknown ({e})"
    return (f"no space left writing {path}: {space} ({one_line(exc)}). Free space there (or move run.dir) "
            f"and {then}; exit {exit_codes.NO_SPACE}: not requeued")


def one_line(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_failed_status(run_dir: Path, code: int, cause: str) -> None:
    """status.json `failed`. On a full disk the usual write (a temporary file, then a rename) can
    fail; overwriting the old file in place reuses its blocks."""
    from mgt_scale.train.callbacks import write_json_atomic
    record = {"state": "failed", "exit_code": code, "reason": cause, "time": time.time()}
    path = run_dir / STATUS_FILE
    try:
        write_json_atomic(path, record)
        return
    except OSError:
        pass
    try:
        with open(path, "w") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True))
    except OSError as e:
        log.warning(f"could not write {path}: {e}")


def crashed(exc: BaseException, run_dir: Path, rank: int) -> int:
    """Report an exception that ended the run (see the header) and return the exit code."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    cause = no_space_message(exc, run_dir)
    if cause is not None:
        code = exit_codes.NO_SPACE
    else:
        code = INTERRUPTED if isinstance(exc, KeyboardInterrupt) else exit_codes.CRASH
        cause = f"crashed: {one_line(exc)}"
    if rank == 0 and run_dir.is_dir():
        write_failed_status(run_dir, code, cause)
    from mgt_scale.logs import lines_name_the_rank  # `[rank N]` already, in a world of several ranks
    log.error(cause if rank == 0 or lines_name_the_rank() else f"rank {rank}: {cause}")
    return code
