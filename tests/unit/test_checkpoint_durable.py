# Checkpoint files on a cluster filesystem: a read error on one rank is a problem string (every rank must
# reach the gather of problems), a writer's own record of its file is what the manifest keeps (rank 0's
# stat of a file another node just wrote can be stale on NFS), and every file is synced before the
# manifest that vouches for it, the manifest before `latest_good`.
from __future__ import annotations

import errno
import json
import os

from mgt_scale.checkpoint import manifest as ckpt_format
from mgt_scale.checkpoint.manifest import MANIFEST, verify_checkpoint, write_manifest


def make_checkpoint(d):
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"m" * 100)
    (d / "optim.pt").write_bytes(b"o" * 50)
    write_manifest(d, {"step": 1})
    return d


def test_an_unreadable_file_is_a_problem_not_an_exception(tmp_path, monkeypatch):
    d = make_checkpoint(tmp_path / "step_00000001")

    def eio(path, chunk=1 << 22):
        raise OSError(errno.EIO, "Input/output error", str(path))
    monkeypatch.setattr(ckpt_format, "sha256_file", eio)
    problems = verify_checkpoint(d)
    assert len(problems) == 2 and all("unreadable (Input/output error)" in p for p in problems), problems


def test_the_manifest_keeps_the_writers_record(tmp_path):
    d = tmp_path / "step_00000002"
    d.mkdir()
    (d / "model.pt").write_bytes(b"m" * 10)
    (d / "config.yaml").write_text("a: 1\n")
    writer = {"model.pt": {"size": 12, "sha256": "ab" * 32, "rank": 3}}  # rank 0 sees 10 bytes: a stale stat
    write_manifest(d, {"step": 2}, hashed=writer)
    files = json.loads((d / MANIFEST).read_text())["files"]
    assert files["model.pt"] == writer["model.pt"]
    assert files["config.yaml"]["size"] == 5 and "rank" not in files["config.yaml"]  # unclaimed: hashed here


def test_files_are_synced_before_the_manifest_names_them(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(ckpt_format, "fsync_file", lambda p: events.append(("file", os.path.basename(p))))
    monkeypatch.setattr(ckpt_format, "fsync_dir", lambda p: events.append(("dir", os.path.basename(p))))
    real_replace = os.replace
    monkeypatch.setattr(ckpt_format.os, "replace",
                        lambda a, b: (events.append(("replace", os.path.basename(b))), real_replace(a, b)))
    make_checkpoint(tmp_path / "step_00000003")
    at = events.index(("replace", MANIFEST))
    assert {("file", "model.pt"), ("file", "optim.pt"), ("dir", "step_00000003")} <= set(events[:at]), events
    assert events[at + 1:] == [("dir", "step_00000003")], events  # the rename itself made durable


def test_latest_good_is_written_durably(tmp_path, monkeypatch):
    from mgt_scale.config import load_config
    from mgt_scale.checkpoint import manager as checkpoint
    written = []
    monkeypatch.setattr(checkpoint, "write_durable", lambda path, text: written.append((path.name, text)))
    manager = checkpoint.CheckpointManager(str(tmp_path), load_config(None, ["data.synthetic=copy"]), 0, 1)
    manager._point_latest("step_00000004")
    assert written == [("latest_good", "step_00000004\n")]


def test_a_conversion_at_resume_does_not_hash_the_verified_source_again(tmp_path, monkeypatch):
    """At resume every rank has just hashed its share of the checkpoint; rank 0 converting it for another
    world size must not hash all of it again, alone, while the others wait in a collective."""
    import subprocess

    from mgt_scale.checkpoint import universal as ckpt_universal
    d = make_checkpoint(tmp_path / "checkpoints" / "step_00000005")
    hashed = []
    real = ckpt_format.sha256_file
    monkeypatch.setattr(ckpt_format, "sha256_file", lambda p, chunk=1 << 22: hashed.append(os.path.basename(p)) or real(p))

    def ds_to_universal(cmd, **kw):  # stands in for DeepSpeed's converter: writes one output file
        out = cmd[cmd.index("--output_folder") + 1]
        os.makedirs(out)
        open(os.path.join(out, "zero.pt"), "wb").close()
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(ckpt_universal.subprocess, "run", ds_to_universal)
    ckpt_universal.make_universal(d, log=lambda *a: None, verified=True)
    assert "model.pt" not in hashed and "optim.pt" not in hashed, hashed
    hashed.clear()
    ckpt_universal.make_universal(d, log=lambda *a: None, force=True)  # `mgt ckpt reshard`: verifies first
    assert {"model.pt", "optim.pt"} <= set(hashed), hashed


def test_reshard_exit_codes_damaged_is_bad_input_converter_failure_is_a_crash(tmp_path, monkeypatch):
    """`mgt ckpt reshard`: a damaged checkpoint is the operator's input (exit 2, like every other damaged
    checkpoint); DeepSpeed's converter failing on a checkpoint that verifies is not (exit 1)."""
    import subprocess

    from mgt_scale import exit_codes
    from mgt_scale.commands import ckpt
    from mgt_scale.checkpoint import universal as ckpt_universal
    run = tmp_path / "run"
    d = make_checkpoint(run / "checkpoints" / "step_00000005")
    monkeypatch.setattr(ckpt_universal.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 3, "", "converter exploded"))
    assert ckpt.main(["reshard", str(run), "--tag", d.name]) == exit_codes.CRASH
    (d / "model.pt").write_bytes(b"x" * 100)  # same size, other bytes
    assert ckpt.main(["reshard", str(run), "--tag", d.name]) == exit_codes.CONFIG_ERROR
