# Tests of `mgt slurm render` that need no SLURM: option validation, hostile values (no shell injection,
# exact round trip of every rendered value), and the job script's exit-code decisions, run outside
# SLURM with stand-in `srun`/`scontrol` on PATH and a stub trainer that exits with chosen per-rank codes.
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mgt_scale.cluster import slurm as S

HOSTILE = "we ird \"q\" 'x' $(touch PWNED1) ; touch PWNED2 `touch PWNED3` %j #h {{RUN_DIR}} &|<>*?!~"


def _config(path: Path, run_dir: Path, name: str = "demo") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": {"dir": str(run_dir), "name": name}, "data": {"synthetic": "copy"},
                                "train": {"max_steps": 10, "warmup_steps": 0}}))
    return path


def _entry(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# stand-in entry script\n")
    return path


def _render_argv(cfg: Path, entry: Path, out: Path, *extra: str) -> list[str]:
    return ["render", "--config", str(cfg), "--time", "01:00:00", "--nodes", "1", "--tasks-per-node", "2",
            "--entry", str(entry), "--output", str(out), "--workdir", str(out.parent), *extra]


def _values_block(script: str) -> str:
    start = script.index("# ---- values rendered")
    end = script.index("# ---- end of rendered values ----")
    return script[start:end]


def test_time_and_names_validation():
    assert S.time_seconds("00:30:00") == 1800
    assert S.time_seconds("2-01:00:05") == (49 * 60 + 0) * 60 + 5
    for bad in ("30", "1:2:3", "00:60:00", "1-24:00:00", "00:00:00", "01:00:00\n", "01:00:00; rm", "-1:00:00"):
        with pytest.raises(S.RenderError):
            S.time_seconds(bad)
    assert S.check_job_name("mgt-run_1.a") == "mgt-run_1.a"
    for bad in ("a b", "a;b", "$(x)", "-x", "", "a" * 65, "a\nb", "a'b"):
        with pytest.raises(S.RenderError):
            S.check_job_name(bad)
    assert S.sanitize_job_name("my run;$(x)") == "my_run___x_"
    assert S.sanitize_job_name("_x") == "mgt-_x"


@pytest.mark.parametrize("extra,msg", [
    (["--job-name", "a;touch x"], "--job-name"),
    (["--job-name", "ok\nname"], "--job-name"),
    (["--set", "train.lr=1\n#SBATCH --x"], "--set"),
    (["--set", "train.nope=1"], "unknown key"),
    (["--partition", "gpu;rm -rf /"], "--partition"),
    (["--account", "a b"], "--account"),
    (["--nodes", "0"], "--nodes"),
    (["--max-crash-retries", "-1"], "--max-crash-retries"),
    (["--signal-seconds", "3600"], "--signal-seconds"),
    (["--signal-seconds", "70000"], "--signal-seconds"),
    (["--python", "/usr/bin/py\0thon"], "--python"),
    (["--min-nodes", "2"], "--min-nodes"),  # more than --nodes 1
    (["--nodes", "2", "--min-nodes", "1", "--set", "parallel.mode=pipeline", "--set", "parallel.pipeline_stages=2",
      "--set", "parallel.zero_stage=0"], "only parallel.mode=zero checkpoints"),  # a pipeline cannot change its world size
    (["--nodes", "4", "--min-nodes", "2", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=1"],
     "3 node(s)"),  # a resume on 3 nodes could not split a batch of 8: refused before a requeue hits it
])
def test_render_rejects_bad_values(tmp_path, capsys, extra, msg):
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "run")
    argv = _render_argv(cfg, _entry(tmp_path / "entry.py"), tmp_path / "job.sbatch", *extra)
    if "\0" in "".join(extra):  # argparse cannot get a NUL from a real command line; test the function
        with pytest.raises(S.RenderError, match=msg):
            S.render(S.JobSpec(config=cfg, time="01:00:00", python=extra[1], entry=tmp_path / "entry.py"))
        return
    assert S.main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "job.sbatch").exists()


def test_hostile_values_do_not_inject(tmp_path):
    base = tmp_path / HOSTILE
    run_dir = base / "run"
    cfg = _config(base / "c $(touch PWNED4).yaml", run_dir, name="x;$(touch PWNED5)")
    entry = _entry(base / "e`touch PWNED6`.py")
    out = tmp_path / "job.sbatch"
    sets = ["train.lr=0.001", "run.name=n $(touch PWNED7); `touch PWNED8` '\"", "log.wandb_project=p;touch PWNED9"]
    argv = _render_argv(cfg, entry, out, "--python", str(base / "py $(touch PWNEDA)"),
                        *[a for s in sets for a in ("--set", s)])
    assert S.main(argv) == 0
    text = out.read_text()
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    # the default job name is the sanitized run.name (after overrides)
    name = S.sanitize_job_name(sets[1].split("=", 1)[1])
    assert re.fullmatch(r"n___touch_PWNED7____touch_PWNED8____", name)
    assert f"\n#SBATCH --job-name={name}\n" in text
    copy = run_dir / "slurm" / f"{name}.config.yaml"
    assert copy.is_file()

    # run the rendered assignments for real and read every value back byte for byte
    probe = _values_block(text) + 'printf "%s\\0" "$WORKDIR" "$RUN_DIR" "$STATE_DIR" "${TRAIN_CMD[@]}"\n'
    p = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True)
    assert p.returncode == 0, p.stderr
    values = p.stdout.decode().split("\0")[:-1]
    expected_cmd = [str(base / "py $(touch PWNEDA)"), "-u", str(entry.resolve()), "--config", str(copy),
                    "--resume", "auto"] + [a for s in sets for a in ("--set", s)]
    assert values == [str(tmp_path), str(run_dir), str(run_dir / "slurm" / "state"), *expected_cmd]
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))

    # #SBATCH lines: exactly one argument each for sbatch's own parser, equal to the intended value
    for line in (ln for ln in text.splitlines() if ln.startswith("#SBATCH")):
        assert len(_sbatch_args(line)) == 1, line
    line = next(ln for ln in text.splitlines() if ln.startswith("#SBATCH --output="))
    assert _sbatch_args(line) == ["--output=" + str(run_dir / "slurm").replace("%", "%%") + "/%x-%j.out"]


def _sbatch_args(line: str) -> list[str]:
    """The arguments sbatch takes from one `#SBATCH` line (a model of _get_argument in src/sbatch/opt.c:
    whitespace ends an argument unless quoted, checked before a backslash escape; an unquoted '#' starts
    a comment). The end-to-end test in test_slurm_jobs.py checks the real sbatch."""
    s, i, args = line[len("#SBATCH"):], 0, []
    while True:
        while i < len(s) and s[i].isspace():
            i += 1
        if i >= len(s):
            return args
        arg, quoted, q, esc = [], False, "", False
        while i < len(s) and (quoted or not s[i].isspace()):
            c = s[i]
            if esc:
                esc = False
            elif c == "\\":
                esc, i = True, i + 1
                continue
            elif quoted:
                if c == q:
                    quoted, i = False, i + 1
                    continue
            elif c in "\"'":
                quoted, q, i = True, c, i + 1
                continue
            elif c == "#":
                i = len(s)
                break
            arg.append(c)
            i += 1
        assert not quoted, f"unmatched quote in {line!r}"
        if arg:
            args.append("".join(arg))


def test_backslash_in_sbatch_path_is_refused(tmp_path, capsys):
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "r\\un")
    assert S.main(_render_argv(cfg, _entry(tmp_path / "e.py"), tmp_path / "job.sbatch")) == 2
    assert "backslash" in capsys.readouterr().err


def test_chain_instruction_is_printed_at_any_log_level(tmp_path, capsys, monkeypatch):
    """`render --chain N`'s "submit it N times" is the command's product: before, an INFO line that
    MGT_LOG_LEVEL=WARNING swallowed."""
    from mgt_scale.logs import setup_logging
    setup_logging(rank=0, world=1, level="WARNING", all_ranks=False)
    try:
        cfg = _config(tmp_path / "cfg.yaml", tmp_path / "run")
        out = tmp_path / "job.sbatch"
        capsys.readouterr()
        assert S.main(_render_argv(cfg, _entry(tmp_path / "e.py"), out, "--chain", "3")) == 0
        assert "submit it 3 times" in capsys.readouterr().out
    finally:
        setup_logging(rank=0, world=1, level="INFO", all_ranks=False)


def test_placeholders_all_filled(tmp_path):
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "run")
    out = tmp_path / "job.sbatch"
    assert S.main(_render_argv(cfg, _entry(tmp_path / "e.py"), out, "--chain", "3", "--partition", "gpu",
                               "--account", "proj1", "--gpus-per-node", "4", "--job-name", "j1")) == 0
    text = out.read_text()
    assert "{{" not in text
    for want in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --dependency=singleton", "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --time=01:00:00", "#SBATCH --job-name=j1", "--kill-on-bad-exit=1", "--resume auto"):
        assert want in text
    assert os.stat(out).st_mode & stat.S_IXUSR


# ----------------------------------------------------------------------------------------------
# The job script's decisions, outside SLURM

FAKE_SRUN = r"""#!/bin/bash
# stand-in srun: run the command once per task with SLURM_PROCID set; exit with the largest code
n=1
while [[ "$1" == --* ]]; do case "$1" in --ntasks-per-node=*) n=${1#*=};; esac; shift; done
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p"; c=$?; [ "$c" -gt "$rc" ] && rc=$c; done
echo "srun" >> "$FAKE_LOG"
exit "$rc"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
[ "$1" = requeue ] && exit "${FAKE_REQUEUE_RC:-0}"
[ "$1 $2" = "show job" ] && echo "JobId=$4 JobName=j JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None \
Restarts=0 RunTime=${FAKE_RUNTIME:-00:10:00} TimeLimit=${FAKE_LIMIT:-01:00:00} TimeMin=N/A"
exit 0
"""
# the "python" of the rendered command: exits with this rank's entry of STUB_CODES
STUB = """#!/bin/bash
set -- $STUB_CODES
shift "$SLURM_PROCID"
case "$1" in
  TERM) kill -TERM $$;;
  KILL) kill -KILL $$;;
  GONE) kill -KILL $PPID; sleep 1; exit 0;;   # the rank dies before its wrapper records a code
  *) exit "$1";;
esac
"""


@pytest.fixture
def job(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("stub", STUB)):
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.yaml", run_dir)
    out = tmp_path / "job.sbatch"
    assert S.main(_render_argv(cfg, _entry(tmp_path / "e.py"), out, "--python", str(bindir / "stub"),
                               "--max-requeues", "3", "--max-crash-retries", "2", "--no-reset-start-time")) == 0
    log = tmp_path / "calls.log"

    def run(codes: str, restarts: int = 0, job_id: int = 42, requeue_rc: int = 0, state: str = "RUNNING",
            runtime: str = "00:10:00", limit: str = "01:00:00"):
        log.write_text("")
        env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_LOG=str(log), STUB_CODES=codes,
                   SLURM_JOB_ID=str(job_id), SLURM_RESTART_COUNT=str(restarts), FAKE_REQUEUE_RC=str(requeue_rc),
                   FAKE_JOB_STATE=state, FAKE_RUNTIME=runtime, FAKE_LIMIT=limit)
        p = subprocess.run(["bash", str(out)], env=env, capture_output=True, text=True, timeout=60)
        calls = log.read_text().splitlines()
        return p.returncode, calls, p.stdout + p.stderr

    run.state_dir = run_dir / "slurm" / "state"
    return run


def _stop_markers(state_dir: Path) -> list[str]:
    return [p.read_text() for p in state_dir.glob("stopped-*")]


@pytest.mark.parametrize("codes,rc,requeued,stopped", [
    ("0 0", 0, False, "finished"),
    ("85 85", 0, True, None),
    ("85 TERM", 0, True, None),            # rank 1 TERMed by --kill-on-bad-exit after rank 0 saved and left
    ("86 TERM", 86, False, "collapse"),    # srun alone would say 143 and the job would be retried
    ("TERM 86", 86, False, "collapse"),
    ("87 87", 87, False, "non-finite"),
    ("88 TERM", 88, False, "no space left"),  # disk full: a retry cannot help until space is freed
    ("TERM 88", 88, False, "no space left"),
    ("2 2", 2, False, "config error"),
    ("1 TERM", 0, True, None),             # a crash: first retry
    ("0 GONE", 0, True, None),             # a rank vanished without a code: a crash
    ("KILL KILL", 0, True, None),          # killed from outside (OOM killer): a crash
])
def test_exit_code_decisions(job, codes, rc, requeued, stopped):
    code, calls, out = job(codes)
    assert code == rc, out
    assert ("scontrol requeue 42" in calls) == requeued, out
    assert calls.count("srun") == 1
    markers = _stop_markers(job.state_dir)
    if stopped:
        assert len(markers) == 1 and stopped in markers[0], out
    else:
        assert markers == [], out


def test_preemption_requeue_budget(job):
    code, calls, out = job("85 85", restarts=3)  # max-requeues 3 already used
    assert code == 85 and "scontrol requeue 42" not in calls, out
    assert "requeue budget is spent" in out
    assert _stop_markers(job.state_dir) == []  # a --chain successor may continue the run


def test_crash_retries_are_bounded(job):
    results = [job("1 TERM", restarts=i) for i in range(3)]
    assert [r[0] for r in results] == [0, 0, 1]
    assert ["scontrol requeue 42" in r[1] for r in results] == [True, True, False]
    assert "2 retries spent (max 2)" in results[2][2]
    # the run is marked stopped: a further start (e.g. the next --chain job) does not run the trainer
    code, calls, out = job("0 0", restarts=3)
    assert code == 0 and calls == [] and "not starting" in out
    # another job id has its own crash count, but the stop marker of this render still holds
    assert job("1 1", job_id=43)[1] == []


def test_failed_requeue_stops(job):
    code, calls, out = job("85 85", requeue_rc=1)
    assert code == 85 and "scontrol requeue 42" in calls
    assert "scontrol requeue failed" in out


@pytest.mark.parametrize("codes", ["85 85", "1 TERM"])
@pytest.mark.parametrize("state,runtime,limit", [
    ("COMPLETING", "00:10:00", "01:00:00"),   # scancel: SLURM shows COMPLETING, before the limit
    ("COMPLETING", "3-00:00:00", "UNLIMITED"),
    ("CANCELLED", "00:10:00", "01:00:00"),
])
def test_cancelled_job_is_not_requeued(job, codes, state, runtime, limit):
    code, calls, out = job(codes, state=state, runtime=runtime, limit=limit)
    assert "scontrol requeue 42" not in calls and code == int(codes.split()[0]), out
    assert "cancelled (scancel" in out
    assert _stop_markers(job.state_dir) == []


@pytest.mark.parametrize("state,runtime,limit", [
    ("COMPLETING", "01:00:31", "01:00:00"),   # wall-time TERM: at/after the limit
    ("COMPLETING", "1-00:00:00", "1-00:00:00"),
    ("TIMEOUT", "01:01:00", "01:00:00"),
])
def test_timed_out_job_is_requeued(job, state, runtime, limit):
    # a step that missed the USR1 window but saved within KillWait after the wall-time TERM
    code, calls, out = job("85 85", state=state, runtime=runtime, limit=limit)
    assert code == 0 and "scontrol requeue 42" in calls, out


def test_job_requeued_by_slurm_is_left_alone(job):
    code, calls, out = job("85 85", state="PENDING")
    assert "scontrol requeue 42" not in calls and "already requeueing" in out


def test_every_no_requeue_code_stops_the_job():
    """exit_codes.NO_REQUEUE and the template's deliberate stops are one list: a code added to one
    (NO_SPACE, 88) and not the other would be retried as a crash, or stop a run that should go on."""
    from mgt_scale import exit_codes
    text = S.TEMPLATE.read_text()
    wanted = {int(c) for c in re.search(r"for want in ([\d ]+); do", text).group(1).split()}
    assert wanted == set(exit_codes.NO_REQUEUE) - {exit_codes.FINISHED}
    for code in wanted:
        assert re.search(rf"^ +{code}\) +stop ", text, re.M), code


@pytest.mark.parametrize("interval,warned", [(0, True), (500, False)])
def test_render_warns_when_nothing_checkpoints_between_signals(tmp_path, capsys, interval, warned):
    """A cluster job without periodic checkpoints loses everything since its start to a crash or a node
    failure (only a preemption signal or the end of the run saves)."""
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "run")
    argv = _render_argv(cfg, _entry(tmp_path / "entry.py"), tmp_path / "job.sbatch",
                        "--set", f"checkpoint.interval={interval}")
    assert S.main(argv) == 0
    assert ("warning: checkpoint.interval=0" in capsys.readouterr().err) == warned


# ----------------------------------------------------------------------------------------------
# Node failure: which nodes the requeued job excludes (outside SLURM: stand-in sinfo / scontrol)

FAKE_SINFO = """#!/bin/bash
echo "sinfo $*" >> "$FAKE_LOG"
case " $* " in
  *" %N %t "*)  # node and compact state: FAKE_DOWN down, FAKE_DRAIN drained, the rest of the partition idle
    for n in ${FAKE_PARTITION//,/ }; do
      case ",$FAKE_DOWN," in *",$n,"*) echo "$n down"; continue;; esac
      case ",${FAKE_DRAIN:-}," in *",$n,"*) echo "$n drain"; continue;; esac
      echo "$n idle"
    done;;
  *" -t down,fail "*) printf '%s\\n' ${FAKE_DOWN//,/ };;
  *" -t "*) printf '%s\\n' ${FAKE_DOWN//,/ } ${FAKE_NORESP//,/ };;  # a state query that includes no_respond
  *) printf '%s\\n' ${FAKE_PARTITION//,/ };;
esac
"""
FAKE_SCONTROL_JOB = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
case "$1 $2" in
  "show hostnames") tr ',' '\\n' <<< "$3";;
  "show job") echo "JobId=$4 JobName=j JobState=${FAKE_JOB_STATE:-PENDING} Reason=None \
Restarts=${FAKE_SHOWN_RESTARTS:-1} Partition=gpu RunTime=00:10:00 TimeLimit=01:00:00 ExcNodeList=${FAKE_EXC:-(null)} NumNodes=1";;
esac
exit 0
"""


@pytest.fixture
def failing_job(tmp_path):
    """Render a job of `nodes` nodes (one task each) and run it once: every rank exits 1 and `sinfo`
    reports FAKE_DOWN (and FAKE_NORESP: not responding only). Returns the `scontrol update` settings
    the requeue helper applied (it runs detached: waited for) and the crash count file's value."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL_JOB), ("sinfo", FAKE_SINFO), ("stub", STUB)):
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "run")

    def run(nodes: int, down: str = "", noresp: str = "", excluded: str = "", partition: str = "",
            extra: tuple[str, ...] = (), mine: str | None = None, drain: str = ""):
        """`excluded`: the job's ExcNodeList now; `mine`: those this script excluded before (its state
        file, newest first), the rest being the operator's."""
        state = tmp_path / "run" / "slurm" / "state"
        state.mkdir(parents=True, exist_ok=True)
        (state / "excluded-42").unlink(missing_ok=True)
        if mine is not None:
            (state / "excluded-42").write_text("".join(f"{n}\n" for n in mine.split(",") if n))
        out = tmp_path / "job.sbatch"
        argv = _render_argv(cfg, _entry(tmp_path / "e.py"), out, "--python", str(bindir / "stub"),
                            "--no-reset-start-time", *extra)
        argv[argv.index("--nodes") + 1], argv[argv.index("--tasks-per-node") + 1] = str(nodes), "1"
        assert S.main(argv) == 0
        log = tmp_path / "calls.log"
        log.write_text("")
        env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_LOG=str(log), STUB_CODES="1",
                   SLURM_JOB_ID="42", SLURM_RESTART_COUNT="0", SLURM_JOB_NUM_NODES=str(nodes),
                   SLURM_JOB_NODELIST="n[1-9]", FAKE_DOWN=down, FAKE_NORESP=noresp, FAKE_EXC=excluded,
                   FAKE_PARTITION=partition, FAKE_DRAIN=drain)
        p = subprocess.run(["bash", str(out)], env=env, capture_output=True, text=True, timeout=60)
        import time
        deadline = time.time() + 20  # the detached helper updates the pending job within ~2 s
        while time.time() < deadline and "scontrol update" not in log.read_text() and down:
            time.sleep(0.2)
        time.sleep(0.5)
        calls = log.read_text().splitlines()
        updates = [c.split(" ", 3)[3] for c in calls if c.startswith("scontrol update JobId=42 ")]
        crashes = run_dir_crashes(tmp_path / "run")
        run.mine = (state / "excluded-42").read_text().split() if (state / "excluded-42").is_file() else None
        return updates, crashes, p.stdout + p.stderr

    return run


def run_dir_crashes(run_dir: Path) -> int:
    f = run_dir / "slurm" / "state" / "crashes-42"
    return int(f.read_text()) if f.is_file() else 0


@pytest.mark.slow  # > 2 s (runs the rendered script several times / a subprocess)
def test_exclusions_accumulate_across_requeues(failing_job):
    # n2 failed at an earlier requeue (the job's ExcNodeList); now n3: before, ExcNodeList=n3 alone
    # and the next start could land on n2 again
    updates, crashes, out = failing_job(1, down="n3", excluded="n2", mine="n2", partition="n1,n2,n3,n4,n5,n6")
    assert updates == ["ExcNodeList=n3,n2"], out
    assert failing_job.mine == ["n3", "n2"]  # the script's own, newest first, for the next failure
    assert crashes == 0  # a node failure is not a crash retry


@pytest.mark.slow  # > 2 s (runs the rendered script several times / a subprocess)
def test_exclusions_are_bounded_by_the_option_and_by_the_partition(failing_job):
    # slurmctld returns ExcNodeList sorted: the age comes from the script's state file, not the list
    updates, _, out = failing_job(1, down="n3", excluded="n2,n4,n5", mine="n5,n4,n2",
                                  partition="n1,n2,n3,n4,n5,n6,n7,n8", extra=("--max-excluded-nodes", "2"))
    assert updates == ["ExcNodeList=n3,n5"], out  # the newest two (before: n3,n2, by the sorted list)
    assert failing_job.mine == ["n3", "n5"]
    # a partition of 4 usable nodes and a job of 2: n3 is down (excluding it costs nothing), n4 kept,
    # n1 the oldest dropped
    updates, _, out = failing_job(2, down="n3", excluded="n1,n4", mine="n4,n1", partition="n1,n2,n3,n4")
    assert updates == ["ExcNodeList=n3,n4"], out


@pytest.mark.slow  # > 2 s (runs the rendered script several times / a subprocess)
def test_the_operators_exclusions_are_always_kept(failing_job):
    """Nodes excluded at submission (--exclude) are not the script's: never dropped, never counted in
    --max-excluded-nodes (before: merged into the capped list, and dropped as the "oldest")."""
    updates, _, out = failing_job(1, down="n3", excluded="n1,n2,n6", mine="n6",
                                  partition="n1,n2,n3,n4,n5,n6,n7,n8", extra=("--max-excluded-nodes", "1"))
    assert updates == ["ExcNodeList=n3,n1,n2"], out
    assert failing_job.mine == ["n3"]


@pytest.mark.slow  # > 2 s (runs the rendered script several times / a subprocess)
def test_down_and_drained_nodes_do_not_count_as_room(failing_job):
    """The job (2 nodes) could never start if fewer than 2 usable nodes stay: of n1..n6, n5 and n6
    are drained and n3 is down, so excluding n2 and n4 (the script's, earlier) would leave n1 alone.
    Before: all 6 nodes counted, and the job was left pending for ever."""
    updates, _, out = failing_job(2, down="n3", excluded="n2,n4", mine="n4,n2", drain="n5,n6",
                                  partition="n1,n2,n3,n4,n5,n6")
    assert updates == ["ExcNodeList=n3,n4"], out
    assert "not excluded" in out and "n2" in out.split("not excluded", 1)[1].splitlines()[0]


def test_no_array_expansion_that_set_u_breaks_on_old_bash():
    """Under `set -u`, bash < 4.4 aborts on "${A[@]}" of an empty array: only arrays that are never
    empty (the rendered srun arguments and command) may be expanded without a guard."""
    text = (Path(S.__file__).resolve().parents[2] / "slurm" / "train.sbatch.in").read_text()
    bare = {m.group(1) for m in re.finditer(r'(?<![+\w])"\$\{(\w+)\[@\]\}"', text)}
    guarded = {m.group(1) for m in re.finditer(r'\$\{(\w+)\[@\]\+"\$\{\1\[@\]\}"\}', text)}
    assert bare - guarded <= {"SRUN_ARGS", "TRAIN_CMD"}, bare - guarded


def test_a_node_only_not_responding_is_not_a_node_failure(failing_job):
    # before: n3 (NOT_RESPONDING, not DOWN) was excluded and the crash was not counted as one
    updates, crashes, out = failing_job(1, noresp="n3", partition="n1,n2,n3")
    assert updates == [] and crashes == 1, out
