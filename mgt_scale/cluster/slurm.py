# `mgt slurm render|submit`: turn a run config into an sbatch script from slurm/train.sbatch.in (signal
# trap, requeue on exit 85, bounded crash retries, --resume auto on every start) and optionally submit it,
# N times with --dependency=singleton for runs longer than the wall limit (--chain N).
# Every value that reaches the script is validated (no newline/NUL, strict formats) and quoted: shell
# values with shlex.quote, `#SBATCH` values in double quotes as sbatch's own line parser expects.
from __future__ import annotations

import argparse
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mgt_scale import exit_codes
from mgt_scale.logs import get_logger

log = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "slurm" / "train.sbatch.in"
DEFAULT_ENTRY = REPO_ROOT / "launch" / "pretrain.py"

JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_LIST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(,[A-Za-z0-9_][A-Za-z0-9_.-]*)*")  # partition/account
TIME_RE = re.compile(r"(?:(\d{1,3})-)?(\d{1,3}):(\d{2}):(\d{2})")
PLACEHOLDER_RE = re.compile(r"\{\{([A-Z_]+)\}\}")
MAX_SIGNAL_SECONDS = 65535  # sbatch's limit for --signal=...@sig_time


class RenderError(ValueError):
    """A value that cannot go into a job script; the message says which option and why."""


@dataclass(frozen=True)
class JobSpec:
    config: Path
    time: str
    overrides: tuple[str, ...] = ()
    nodes: int = 1
    tasks_per_node: int = 1
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None  # None: the config's run.name, sanitized
    max_requeues: int = 20
    max_crash_retries: int = 2
    signal_seconds: int = 300
    chain: int = 1
    entry: Path = DEFAULT_ENTRY
    python: str = sys.executable
    workdir: Path = Path(".")
    gpus_per_node: int = 0
    cpus_per_task: int = 0
    reset_start_time: bool = True
    min_nodes: int = 0  # 0: = nodes. Fewer: a job that lost a node may (re)start on the remaining ones
    max_excluded_nodes: int = 8  # failed nodes a job's requeues keep in its ExcNodeList (newest first)


# ----------------------------------------------------------------------------------------------
# Validation and quoting


def check_text(option: str, value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise RenderError(f"{option}: newlines and NUL characters are not allowed ({value!r})")
    return value


def check_int(option: str, value: int, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise RenderError(f"{option}: must be an integer >= {minimum}{upper}, got {value!r}")
    return value


def time_seconds(value: str) -> int:
    """Seconds in a SLURM time limit written HH:MM:SS or D-HH:MM:SS (the only forms we accept)."""
    check_text("--time", value)
    m = TIME_RE.fullmatch(value)
    if m is None:
        raise RenderError(f"--time: expected HH:MM:SS or D-HH:MM:SS, got {value!r}")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    if minutes > 59 or seconds > 59 or (m.group(1) and hours > 23):
        raise RenderError(f"--time: minutes/seconds must be < 60 (hours < 24 with days), got {value!r}")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise RenderError(f"--time: must be > 0, got {value!r}")
    return total


def check_job_name(value: str) -> str:
    check_text("--job-name", value)
    if not JOB_NAME_RE.fullmatch(value):
        raise RenderError(f"--job-name: {value!r} is not a safe job name: use letters, digits, '_', '.', '-' "
                          f"(max 64, starting with a letter or digit), e.g. {sanitize_job_name(value)!r}")
    return value


def sanitize_job_name(value: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:64]
    if not name or not name[0].isalnum():
        name = ("mgt-" + name)[:64]
    return name


def sbatch_escape(value: str) -> str:
    """Quote a value for an `#SBATCH --opt=VALUE` line. sbatch splits those lines itself (not a shell):
    whitespace ends a value unless it is inside quotes, an unquoted '#' starts a comment, and inside
    quotes a backslash makes the next character literal. So: plain values stay as they are, anything else
    goes in double quotes with '"' escaped. Backslashes are refused: sbatch's filename patterns treat
    one as 'do not expand %j', and no path we render needs one."""
    check_text("#SBATCH value", value)
    if "\\" in value:
        raise RenderError(f"backslashes cannot be passed safely to sbatch: {value!r}")
    if re.fullmatch(r"[A-Za-z0-9_./:@%+,=-]+", value):
        return value
    return '"' + value.replace('"', '\\"') + '"'


def log_pattern(log_dir: Path) -> str:
    """`<log_dir>/%x-%j.out` with any '%' of the directory doubled so sbatch keeps it literal."""
    return str(log_dir).replace("%", "%%") + "/%x-%j.out"


# ----------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Rendered:
    script: str
    run_dir: Path
    config_copy: Path
    job_name: str
    render_id: str


def _resolve_run(spec: JobSpec):
    """Load and validate the config with the overrides (mgt_scale.config rules); return it, the run
    dir (config run.dir, relative to the workdir) and the job name."""
    from mgt_scale.config import ConfigError, load_config

    for o in spec.overrides:
        check_text("--set", o)
    check_text("--config", str(spec.config))
    try:
        cfg = load_config(spec.config, list(spec.overrides))
    except ConfigError as e:
        raise RenderError(f"config: {e}") from None
    workdir = spec.workdir.resolve()
    run_dir = Path(cfg.run.dir)
    run_dir = run_dir if run_dir.is_absolute() else workdir / run_dir
    job_name = check_job_name(spec.job_name) if spec.job_name is not None else sanitize_job_name(cfg.run.name)
    return cfg, run_dir, job_name


def render(spec: JobSpec, write_config: bool = True) -> Rendered:
    """Validate `spec`, save the resolved config into <run dir>/slurm/ (unless write_config=False) and
    return the script text. Raises RenderError."""
    for opt, val, lo in (("--nodes", spec.nodes, 1), ("--tasks-per-node", spec.tasks_per_node, 1),
                         ("--max-requeues", spec.max_requeues, 0), ("--max-crash-retries", spec.max_crash_retries, 0),
                         ("--chain", spec.chain, 1), ("--gpus-per-node", spec.gpus_per_node, 0),
                         ("--cpus-per-task", spec.cpus_per_task, 0), ("--max-excluded-nodes", spec.max_excluded_nodes, 0)):
        check_int(opt, val, lo)
    check_int("--signal-seconds", spec.signal_seconds, 1, MAX_SIGNAL_SECONDS)
    check_int("--min-nodes", spec.min_nodes, 0, spec.nodes)
    min_nodes = spec.min_nodes or spec.nodes
    limit = time_seconds(spec.time)
    if spec.signal_seconds >= limit:
        raise RenderError(f"--signal-seconds: {spec.signal_seconds}s is not shorter than --time {spec.time} "
                          f"({limit}s): the checkpoint signal would fire at the start")
    for opt, val in (("--partition", spec.partition), ("--account", spec.account)):
        if val is not None and not NAME_LIST_RE.fullmatch(check_text(opt, val)):
            raise RenderError(f"{opt}: {val!r} must be letters, digits, '_', '.', '-' (comma-separated list)")
    for opt, val in (("--python", spec.python), ("--entry", str(spec.entry)), ("--workdir", str(spec.workdir))):
        check_text(opt, val)
    entry = spec.entry.resolve()
    if not entry.is_file():
        raise RenderError(f"--entry: training script {entry} not found")
    if not spec.workdir.is_dir():
        raise RenderError(f"--workdir: {spec.workdir} is not a directory")

    cfg, run_dir, job_name = _resolve_run(spec)
    if min_nodes < spec.nodes and cfg.parallel.mode != "zero":
        raise RenderError(f"--min-nodes {min_nodes} < --nodes {spec.nodes}: a job resumed on fewer nodes changes "
                          f"its world size, which only parallel.mode=zero checkpoints can follow (this run is "
                          f"{cfg.parallel.mode}); drop --min-nodes")
    if min_nodes < spec.nodes:  # a requeue after a node failure may come back on any count in between
        from mgt_scale.config import ConfigError
        from mgt_scale.parallel.topology import plan_batch
        bad = []
        for n in range(min_nodes, spec.nodes):
            try:
                plan_batch(cfg, n * spec.tasks_per_node)
            except (ConfigError, ValueError) as e:
                bad.append(f"{n} node(s): {e}")
        if bad:
            raise RenderError(f"--min-nodes {min_nodes}: the run cannot continue on every node count down to it "
                              f"(a resume there would stop with a config error): {'; '.join(bad)}; raise "
                              "--min-nodes, or choose a global batch that every such world size divides")
    if cfg.checkpoint.interval == 0:
        log.warning("checkpoint.interval=0: only a preemption signal or the end of the run checkpoints, so a "
                    "crash or a node failure requeues this job from step 0; set checkpoint.interval (e.g. --set "
                    "checkpoint.interval=500)")
    state_dir = run_dir / "slurm"
    config_copy = state_dir / f"{job_name}.config.yaml"
    log_value = sbatch_escape(log_pattern(state_dir))  # refuse before writing anything
    if write_config:
        from mgt_scale.config import save_config

        state_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
        save_config(cfg, config_copy)

    extra = []
    if spec.partition:
        extra.append(f"#SBATCH --partition={sbatch_escape(spec.partition)}")
    if spec.account:
        extra.append(f"#SBATCH --account={sbatch_escape(spec.account)}")
    if spec.gpus_per_node:
        extra.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        extra.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    if spec.chain > 1:
        extra.append("#SBATCH --dependency=singleton  # --chain: one job of this name runs at a time")

    # --nodes=<the job's node count> is added by the script (with --min-nodes it varies between starts)
    srun_args = ["--kill-on-bad-exit=1", f"--ntasks-per-node={spec.tasks_per_node}"]
    if spec.cpus_per_task:
        srun_args.append(f"--cpus-per-task={spec.cpus_per_task}")
    train_cmd = [spec.python, "-u", str(entry), "--config", str(config_copy), "--resume", "auto"]
    for o in spec.overrides:
        train_cmd += ["--set", o]
    render_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)

    q = shlex.quote
    values = {
        "JOB_NAME": sbatch_escape(job_name),
        "NODES": str(spec.nodes),
        "MAX_NODES": str(spec.nodes),
        "MIN_NODES": str(min_nodes),
        "MAX_EXCLUDED": str(spec.max_excluded_nodes),
        "TASKS_PER_NODE": str(spec.tasks_per_node),
        "TIME": spec.time,
        "SIGNAL_SECONDS": str(spec.signal_seconds),
        "LOG_PATTERN": log_value,
        "SBATCH_EXTRA": "\n".join(extra),
        "RENDER_ID": q(render_id),
        "WORKDIR": q(str(spec.workdir.resolve())),
        "RUN_DIR": q(str(run_dir)),
        "STATE_DIR": q(str(state_dir / "state")),
        "MAX_REQUEUES": str(spec.max_requeues),
        "MAX_CRASH_RETRIES": str(spec.max_crash_retries),
        "RESET_START_TIME": "1" if spec.reset_start_time else "0",
        "SRUN_ARGS": " ".join(q(a) for a in srun_args),
        "TRAIN_CMD": " ".join(q(a) for a in train_cmd),
    }
    template = TEMPLATE.read_text()

    def fill(m: re.Match) -> str:
        if m.group(1) not in values:
            raise RenderError(f"template {TEMPLATE}: unknown placeholder {m.group(0)}")
        return values[m.group(1)]

    # one pass: a value that happens to contain '{{X}}' is never expanded again
    script = PLACEHOLDER_RE.sub(fill, template)
    return Rendered(script=script, run_dir=run_dir, config_copy=config_copy, job_name=job_name,
                    render_id=render_id)


def write_script(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)


def submit(script: Path, chain: int, sbatch: str = "sbatch") -> list[int]:
    """sbatch the script `chain` times (the script carries --dependency=singleton when chain > 1)."""
    if shutil.which(sbatch) is None:
        raise RenderError("sbatch not found: submit on a SLURM login node, or use `mgt slurm render`")
    ids = []
    for _ in range(chain):
        p = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
        ids.append(int(p.stdout.strip().split(";")[0]))
    return ids


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mgt slurm", description="Render or submit the sbatch script of a run "
                                 "(requeue on preemption, bounded crash retries, --resume auto).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("render", "write the sbatch script"), ("submit", "render next to the run dir, sbatch it")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--config", required=True, type=Path, help="run config (YAML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                       help="dotted config override, repeatable (saved in the resolved copy and passed on)")
        p.add_argument("--nodes", type=int, default=1)
        p.add_argument("--tasks-per-node", type=int, default=1, help="ranks per node (usually GPUs per node)")
        p.add_argument("--min-nodes", type=int, default=0,
                       help="fewest nodes a start may get (default: --nodes): after a node failure the requeued job "
                            "resumes on the remaining nodes with a smaller data-parallel size (zero3 only)")
        p.add_argument("--max-excluded-nodes", type=int, default=8,
                       help="failed nodes the job's requeues keep excluded (ExcNodeList, newest first; never so "
                            "many that the partition's usable nodes cannot give the job its nodes; nodes "
                            "excluded at submission are kept besides)")
        p.add_argument("--time", required=True, help="wall limit per job, HH:MM:SS or D-HH:MM:SS")
        p.add_argument("--partition")
        p.add_argument("--account")
        p.add_argument("--job-name", help="default: the config's run.name (made safe)")
        p.add_argument("--max-requeues", type=int, default=20, help="requeues per job (exit 85 or crash)")
        p.add_argument("--max-crash-retries", type=int, default=2, help="requeues after a crash, per job")
        p.add_argument("--signal-seconds", type=int, default=300,
                       help="USR1 this many seconds before the wall limit: time to write a checkpoint")
        p.add_argument("--chain", type=int, default=1, help="submit N jobs run one after the other "
                       "(--dependency=singleton) for runs longer than the wall limit")
        p.add_argument("--gpus-per-node", type=int, default=0)
        p.add_argument("--cpus-per-task", type=int, default=0)
        p.add_argument("--entry", type=Path, default=DEFAULT_ENTRY, help=f"training script (default {DEFAULT_ENTRY})")
        p.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes (default: this one)")
        p.add_argument("--workdir", type=Path, default=Path("."), help="job working dir (default: here)")
        p.add_argument("--no-reset-start-time", dest="reset_start_time", action="store_false",
                       help="keep SLURM's ~2 min delay before a requeued job starts again")
        if name == "render":
            p.add_argument("--output", required=True, type=Path, help="where to write the script")
        else:
            p.add_argument("--output", type=Path, help="script path (default <run dir>/slurm/<job name>.sbatch)")
            p.add_argument("--dry-run", action="store_true", help="render and print the sbatch commands only")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    spec = JobSpec(config=args.config, time=args.time, overrides=tuple(args.overrides), nodes=args.nodes,
                   tasks_per_node=args.tasks_per_node, partition=args.partition, account=args.account,
                   job_name=args.job_name, max_requeues=args.max_requeues, max_crash_retries=args.max_crash_retries,
                   signal_seconds=args.signal_seconds, chain=args.chain, entry=args.entry, python=args.python,
                   workdir=args.workdir, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                   reset_start_time=args.reset_start_time, min_nodes=args.min_nodes,
                   max_excluded_nodes=args.max_excluded_nodes)
    try:
        if args.output is not None:
            check_text("--output", str(args.output))
        r = render(spec)
        out = args.output or (r.run_dir / "slurm" / f"{r.job_name}.sbatch")
        write_script(r.script, out)
        log.info(f"wrote {out} (job {r.job_name}, {spec.nodes} node(s) x {spec.tasks_per_node} task(s), "
                 f"resolved config {r.config_copy})")
        if args.cmd == "render":
            if spec.chain > 1:  # the command's product (what to do with the script): output, not logging
                print(f"chain: submit it {spec.chain} times (`sbatch {shlex.quote(str(out))}`): "
                      f"--dependency=singleton runs them one after the other")
            return exit_codes.FINISHED
        if args.dry_run:
            for _ in range(spec.chain):
                print(f"sbatch --parsable {shlex.quote(str(out))}")
            return exit_codes.FINISHED
        ids = submit(out, spec.chain)
    except RenderError as e:
        log.error(f"mgt slurm: {e}")
        return exit_codes.CONFIG_ERROR
    except (RuntimeError, OSError) as e:
        log.error(f"mgt slurm: {e}")
        return 1
    for i in ids:
        print(i)
    return exit_codes.FINISHED


if __name__ == "__main__":
    sys.exit(main())
