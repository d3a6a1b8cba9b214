# A run that raises must not leave status.json saying `running` (issue #28): any exception ends with
# status.json `failed`, the exit code and a one-line cause, the traceback still on stderr. A full disk
# (ENOSPC/EDQUOT, also as torch's writer RuntimeError, which carries no errno) exits
# exit_codes.NO_SPACE (not requeued by the SLURM job script) with the path and the free space.
# Classification and status writing in-process (mgt_scale/train/failure.py); end to end, `mgt train`
# subprocesses whose faults come from a sitecustomize in the test's tmp dir (no fault code in the trainer).
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgt_scale import exit_codes
from mgt_scale.train import failure
from mgt_scale.train.failure import crashed, no_space_message, writing

REPO = Path(__file__).resolve().parents[2]


def torch_write_error(where: Path) -> RuntimeError:
    """What torch.save raises when its writes fail (ENOSPC underneath; it keeps no errno), annotated
    with `where` as CheckpointManager.save does."""
    try:
        with writing(where):
            torch.save({"w": torch.zeros(1000)}, "/dev/full")
    except RuntimeError as e:
        return e
    raise AssertionError("torch.save to /dev/full did not fail")


def full_disk(monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(failure.shutil, "disk_usage", lambda p: type(real(p))(real(p).total, real(p).total, 0))


def test_enospc_names_the_file_and_the_free_space(tmp_path):
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))
    msg = no_space_message(e, tmp_path / "elsewhere")
    assert msg.startswith(f"no space left writing {tmp_path / 'metrics.jsonl'}: ")
    assert re.search(r": \d+\.\d\d GiB free of \d+\.\d\d GiB on the filesystem of ", msg), msg
    assert f"exit {exit_codes.NO_SPACE}" in msg


@pytest.mark.parametrize("how", ["cause", "context", "quota"])
def test_enospc_is_found_when_wrapped(tmp_path, how):
    code = errno.EDQUOT if how == "quota" else errno.ENOSPC
    inner = OSError(code, os.strerror(code))
    try:
        with writing(tmp_path / "checkpoints" / "step_00000004"):
            try:
                raise inner
            except OSError as e:
                if how == "context":
                    raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
                raise RuntimeError("save failed") from e
    except RuntimeError as e:
        msg = no_space_message(e, tmp_path)
    assert msg is not None and f"writing {tmp_path / 'checkpoints' / 'step_00000004'}: " in msg


def test_torch_write_error_is_no_space_only_when_the_filesystem_is_full(tmp_path, monkeypatch):
    e = torch_write_error(tmp_path / "step_00000004")
    assert no_space_message(e, tmp_path) is None  # the disk has room: a crash, retried
    assert not list(tmp_path.iterdir())  # the probe left nothing behind
    full_disk(monkeypatch)
    msg = no_space_message(e, tmp_path)
    assert msg.startswith(f"no space left writing {tmp_path / 'step_00000004'}: 0.00 GiB free of ")


def test_torch_write_error_under_a_spent_quota(tmp_path, monkeypatch):
    # a quota does not show in the free space: a small probe write is refused with EDQUOT
    def refuse(*a, **k):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    e = torch_write_error(tmp_path / "step_00000004")
    monkeypatch.setattr(failure, "open", refuse, raising=False)
    assert no_space_message(e, tmp_path) is not None


def test_other_errors_are_crashes(tmp_path, capsys):
    (tmp_path / "status.json").write_text(json.dumps({"state": "running"}))
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError as e:
        code = crashed(e, tmp_path, rank=0)
    assert code == exit_codes.CRASH
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == exit_codes.CRASH
    assert status["reason"] == "crashed: ValueError: bad value second line"
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: crashed: ValueError: bad value second line"


def test_failed_status_is_written_in_place_when_a_new_file_does_not_fit(tmp_path, monkeypatch):
    import mgt_scale.train.callbacks as callbacks
    (tmp_path / "status.json").write_text(json.dumps({"state": "running"}))

    def no_room(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".tmp")
    monkeypatch.setattr(callbacks, "write_json_atomic", no_room)
    code = crashed(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp_path, rank=0)
    assert code == exit_codes.NO_SPACE
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == exit_codes.NO_SPACE


# -- end to end: `mgt train`, ZeRO-3 on CPU, one rank ----------------------------------------------
def run_with_fault(tmp_path: Path, sitecustomize: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(sitecustomize)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config",
                        str(REPO / "configs" / "tiny_synthetic.yaml"), "--set", f"run.dir={run_dir}",
                        "--set", "train.max_steps=6", "--set", "checkpoint.interval=2"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    return r, run_dir


@pytest.mark.slow
def test_an_unexpected_exception_leaves_failed_status(tmp_path):
    r, run_dir = run_with_fault(tmp_path, """
import mgt_scale.train.schedule as schedule
real = schedule.lr_at
def lr_at(t, step):
    if step == 3:
        raise ValueError("a bad value that slipped through")
    return real(t, step)
schedule.lr_at = lr_at
""")
    assert r.returncode == exit_codes.CRASH, r.stdout[-2000:] + r.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == exit_codes.CRASH
    assert status["reason"] == "crashed: ValueError: a bad value that slipped through"
    assert "Traceback (most recent call last)" in r.stderr and "in lr_at" in r.stderr


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_save_exits_no_space(tmp_path):
    # torch.save into step 4 writes to /dev/full (torch's own error for a failed write, no errno), and
    # from then on the filesystem reports no free space, as a full one does
    r, run_dir = run_with_fault(tmp_path, """
import os, shutil, torch
real_save, real_usage, full = torch.save, shutil.disk_usage, []
def save(obj, f, *a, **k):
    if isinstance(f, (str, os.PathLike)) and "step_00000004" in str(f):
        full.append(str(f))
        f = "/dev/full"
    return real_save(obj, f, *a, **k)
def disk_usage(p):
    u = real_usage(p)
    return type(u)(u.total, u.total, 0) if full else u
torch.save, shutil.disk_usage = save, disk_usage
""")
    ck = run_dir / "checkpoints" / "step_00000004"
    assert r.returncode == exit_codes.NO_SPACE, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left writing {ck}: 0.00 GiB free of "), last
    assert "Traceback (most recent call last)" in r.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == exit_codes.NO_SPACE
    assert status["reason"] == last[len("error: "):]
    assert (run_dir / "checkpoints" / "step_00000002" / "mgt_manifest.json").is_file()
    assert not (ck / "mgt_manifest.json").exists()


@pytest.mark.parametrize("world, last", [(4, "[rank 2] error: crashed: ValueError: boom"),
                                         (1, "error: rank 2: crashed: ValueError: boom")])
def test_a_crash_line_names_its_rank_once(tmp_path, capsys, world, last):
    """The formatter prefixes `[rank N]` in a world of several ranks: before, `[rank 2] error: rank 2:`."""
    from mgt_scale.logs import setup_logging
    setup_logging(rank=2, world=world, level="INFO", all_ranks=False)
    try:
        try:
            raise ValueError("boom")
        except ValueError as e:
            assert crashed(e, tmp_path, rank=2) == exit_codes.CRASH
        assert capsys.readouterr().err.strip().splitlines()[-1] == last
    finally:
        setup_logging(rank=0, world=1, level="INFO", all_ranks=False)


@pytest.mark.parametrize("err, code", [(errno.ENOSPC, exit_codes.NO_SPACE), (errno.EDQUOT, exit_codes.NO_SPACE),
                                       (errno.EACCES, exit_codes.CONFIG_ERROR)])
def test_export_out_of_space_exits_no_space(tmp_path, monkeypatch, capsys, err, code):
    """`mgt export` mapped every OSError to 2; a full disk or spent quota is 88, as for training."""
    from mgt_scale.commands import export as cmd

    def full(src, output, dtype="fp32", log=None):
        raise OSError(err, os.strerror(err), str(Path(output) / "model.safetensors"))
    monkeypatch.setattr(cmd, "export", full)
    capsys.readouterr()
    assert cmd.main([str(tmp_path), "--output", str(tmp_path / "out")]) == code
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("no space left writing" in last) == (code == exit_codes.NO_SPACE), last
    assert str(tmp_path / "out" / "model.safetensors") in last
