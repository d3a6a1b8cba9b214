# A checkpoint records the identity of its data's tokenizer (sha256 of tokenizer.model + vocab size, from
# the `mgt prep` manifest), and a resume onto data with another tokenizer is refused before any step: the
# token ids would name other pieces and training would go on from garbage with no error (the loss jumped
# from 3.9 to 8.2). Checkpoints written before identities were recorded resume with a warning.
# Fast checks of the helpers, then end to end through `mgt prep` and `mgt train` subprocesses (one rank,
# ZeRO-3 on CPU).
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mgt_scale.config import BlendSource, DataConfig
from mgt_scale.data import data_tokenizer_identity
from mgt_scale.data import prep as P
from mgt_scale.data.shards import sha256_file
from mgt_scale.checkpoint.manifest import MANIFEST, data_tokenizer_problem

VOCAB = 400  # both corpora: the same vocabulary size, other tokenizers (the silent case)


def _manifest(tmp_path: Path, name: str, sha: str, vocab: int) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format": "mgt-shards", "format_version": 1, "vocab_size": vocab,
                                                 "dtype": "uint16", "eos_id": 1, "splits": {},
                                                 "tokenizer": {"file": "tokenizer.model", "sha256": sha}}))
    return d


def test_identity_of_shards_blend_and_synthetic(tmp_path):
    a = _manifest(tmp_path, "a", "aa" * 32, 300)
    ident = data_tokenizer_identity(DataConfig(path=str(a)), 512)
    assert ident == {"tokenizer_sha256": "aa" * 32, "vocab_size": 300, "source": str(a.absolute() / "manifest.json")}
    assert data_tokenizer_identity(DataConfig(blend=(BlendSource(str(a), 1.0),)), 512)["tokenizer_sha256"] == "aa" * 32
    assert data_tokenizer_identity(DataConfig(synthetic="copy"), 64) == {
        "tokenizer_sha256": None, "vocab_size": 64, "source": "data.synthetic=copy"}


def test_checkpoint_identity_check(tmp_path):
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    saved = {"tokenizer_sha256": "aa" * 32, "vocab_size": 300, "source": "/data/a/manifest.json"}
    (tag / MANIFEST).write_text(json.dumps({"step": 2, "data_tokenizer": saved}))
    # the same tokenizer prepared elsewhere (another path) is the same token space
    assert data_tokenizer_problem(tag, dict(saved, source="/copy/manifest.json")) == (None, None)
    for other in ({"tokenizer_sha256": "bb" * 32, "vocab_size": 300},   # another tokenizer, same size
                  {"tokenizer_sha256": "aa" * 32, "vocab_size": 301},
                  {"tokenizer_sha256": None, "vocab_size": 300, "source": "data.synthetic=copy"}):
        error, warning = data_tokenizer_problem(tag, other)
        assert warning is None and "aa" * 32 in error and str(other["tokenizer_sha256"] or "no tokenizer") in error
    (tag / MANIFEST).write_text(json.dumps({"step": 2}))  # written before identities were recorded
    error, warning = data_tokenizer_problem(tag, saved)
    assert error is None and "records no data tokenizer identity" in warning


# ---------------------------------------------------------------------------------------------------
# End to end


def _stdlib(n: int, offset: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 4_000 < p.stat().st_size < 20_000)
    return files[offset::7][:n]


def _prep(tmp_path: Path, name: str, offset: int) -> Path:
    src = tmp_path / f"{name}_src"
    src.mkdir()
    for f in _stdlib(6, offset):
        shutil.copyfile(f, src / f.name)
    out = tmp_path / name
    assert P.main(["--input", str(src), "--output", str(out), "--vocab-size", str(VOCAB), "--no-progress",
                   "--valid-fraction", "0.2"]) == 0
    return out


def _config(tmp_path: Path, data: Path, **data_extra) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    cfg = {"run": {"dir": str(run_dir), "name": "tok"},
           "model": {"num_layers": 2, "d_model": 32, "num_heads": 4, "d_ff": 64, "vocab_size": 512,
                     "max_seq_len": 32},
           "data": {"path": str(data), "seq_len": 16, "prefetch": 0, "valid_fraction_batches": 1, **data_extra},
           "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1,
                     "log_interval": 1},
           "parallel": {"precision": "fp32"},
           "checkpoint": {"interval": 2, "keep_last": 5},
           "monitor": {"interval": 0}}
    path = tmp_path / "tok.yaml"
    path.write_text(json.dumps(cfg))
    return path, run_dir


def _train(config: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, WANDB_MODE="disabled"))


def _fingerprint(ck: Path) -> dict:
    return {str(p.relative_to(ck)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ck.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tok")
    a, b = _prep(d, "a", 0), _prep(d, "b", 3)
    assert sha256_file(a / "tokenizer.model") != sha256_file(b / "tokenizer.model")
    return a, b


@pytest.mark.slow
def test_resume_onto_data_with_another_tokenizer_is_refused(corpora, tmp_path):
    a, b = corpora
    sha_a, sha_b = sha256_file(a / "tokenizer.model"), sha256_file(b / "tokenizer.model")
    config, run_dir = _config(tmp_path, a)
    first = _train(config)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ck = run_dir / "checkpoints"
    saved = json.loads((ck / "step_00000004" / MANIFEST).read_text())["data_tokenizer"]
    assert (saved["tokenizer_sha256"], saved["vocab_size"]) == (sha_a, VOCAB)
    before = _fingerprint(ck)

    # B was prepared with another tokenizer of the same size: nothing else would notice
    refused = _train(config, "--resume", "auto", "--set", f"data.path={b}", "--set", "train.max_steps=6")
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert sha_a in refused.stderr and sha_b in refused.stderr and "step_00000004" in refused.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 2
    assert _fingerprint(ck) == before  # no new checkpoint, nothing rewritten

    # a checkpoint from before identities were recorded: resumes, with a warning
    m = ck / "step_00000004" / MANIFEST
    m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "data_tokenizer"}))
    legacy = _train(config, "--resume", "auto", "--set", "train.max_steps=6")
    assert legacy.returncode == 0, legacy.stdout[-3000:] + legacy.stderr[-3000:]
    assert "records no data tokenizer identity" in legacy.stderr
    assert json.loads((ck / "step_00000006" / MANIFEST).read_text())["data_tokenizer"]["tokenizer_sha256"] == sha_a


@pytest.mark.slow
def test_blended_data_larger_than_the_model_vocab_is_refused_naming_it(corpora, tmp_path):
    a, _ = corpora
    config, run_dir = _config(tmp_path, a)
    cfg = json.loads(config.read_text())
    cfg["data"].pop("path")
    cfg["data"]["blend"] = [{"path": str(a), "weight": 1.0}]
    cfg["model"]["vocab_size"] = VOCAB - 20
    config.write_text(json.dumps(cfg))
    r = _train(config)
    assert r.returncode == 2 and str(a) in r.stderr and f"model.vocab_size={VOCAB - 20}" in r.stderr, r.stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    assert not (run_dir / "checkpoints").exists()
