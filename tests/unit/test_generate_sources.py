# Using a trained model (issue #28): `mgt generate` and `mgt probe` read a run directory or a checkpoint
# directory directly (consolidated in memory, the run directory untouched) besides an export, with the
# config saved with the weights; a --config that does not fit the weights is exit 2 naming the config
# file and the first mismatching tensor; a model vocabulary larger than the tokenizer's samples only
# the tokenizer's ids, a smaller one is refused (exit 2, both sizes named). Exit codes and the CLI
# (--version, a closed pipe) are checked in subprocesses.
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgt_scale.config import load_config, save_config

OVR = ["data.synthetic=copy", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
       "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16", "monitor.interval=0",
       "monitor.probe_seq_len=16", "monitor.probe_batch_size=2",
       "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.precision=fp32"]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x = 0\n    y = 1\n",
        "for i in range(10):\n    print(i * i)\n", "import os\nimport sys\n"] * 20


def mgt(*args, **kw):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, **kw)


def snapshot(d: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def make_export(out: Path, vocab: int, tokenizer: Path | None, extra=()) -> Path:
    """An export directory written by hand: random weights of a tiny model, config.yaml, tokenizer."""
    from safetensors.torch import save_file
    from mgt_scale.model import build_model
    cfg = load_config(None, OVR + [f"model.vocab_size={vocab}", *extra])
    model = build_model(cfg.model, seed=1)
    sd = dict(model.state_dict())
    if cfg.model.tie_embeddings:
        sd.pop("head.proj.weight")
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    save_config(cfg, out / "config.yaml")
    if tokenizer is not None:
        shutil.copy2(tokenizer, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from mgt_scale.data.tokenizer import train_tokenizer
    p = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tok = train_tokenizer(TEXT, p, vocab_size=300, model_type="bpe", seed=0)
    assert tok.vocab_size == 300
    return p


@pytest.fixture(scope="module")
def saved(tmp_path_factory, inprocess_dist):
    """A run directory with two real ZeRO-3 checkpoints and its export."""
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.checkpoint.manager import CheckpointManager
    from mgt_scale.engine.zero import ZeroEngine
    from mgt_scale.train.export import export
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, OVR + [f"run.dir={run_dir}"])
    save_config(cfg, run_dir / "config.yaml")
    e = ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")
    g = torch.Generator().manual_seed(0)
    mgr = CheckpointManager(str(run_dir), cfg, 0, 1)
    for step in (1, 2):
        e.train_step([(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))])
        mgr.save(e, step, {"loader": {"consumed_samples": 4 * step}})
    out = export(run_dir, tmp_path_factory.mktemp("export") / "exp", log=lambda *_: None)
    return run_dir, out


def generate(capsys, *args) -> tuple[int, str, str]:
    from mgt_scale.commands.generate import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ run and checkpoint directories
@pytest.mark.slow
def test_generate_from_run_and_checkpoint_dir_equals_export(saved, capsys):
    run_dir, exp = saved
    before = snapshot(run_dir)
    args = ("--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--temperature", "0")
    code, ref, err = generate(capsys, exp, *args)
    assert code == 0, err
    for src in (run_dir, run_dir / "checkpoints" / "step_00000002"):
        code, out, err = generate(capsys, src, *args)
        assert code == 0, err
        assert out == ref and len(out.strip().split(",")) == 8
    assert snapshot(run_dir) == before  # nothing written into the run directory


@pytest.mark.slow
def test_probe_from_run_dir_without_config(saved, tmp_path):
    import json
    from mgt_scale.commands.probe import main
    run_dir, _ = saved
    assert main(["--checkpoint", str(run_dir), "--json", str(tmp_path / "g.json")]) == 0
    geo = json.loads((tmp_path / "g.json").read_text())
    assert geo["num_layers"] == 2 and len(geo["layers"]) == 3


@pytest.mark.slow
def test_generate_damaged_checkpoint_and_missing_dir_exit_2(saved, tmp_path, capsys):
    run_dir, _ = saved
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    tag = copy / "checkpoints" / "step_00000002"
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    code, _, err = generate(capsys, tag, "--prompt-ids", "1")
    assert code == 2 and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in err and len(err.strip().splitlines()) == 1
    code, _, err = generate(capsys, tmp_path / "nowhere", "--prompt-ids", "1")
    assert code == 2 and str(tmp_path / "nowhere") in err
    from mgt_scale.commands.export import main as export_main
    assert export_main([str(tag), "--output", str(tmp_path / "x")]) == 2
    assert export_main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2


# ------------------------------------------------------------------ a config that does not fit
@pytest.mark.parametrize("change, tensor", [("model.d_model=48", "embed.tok.weight"),
                                            ("model.num_layers=3", "blocks.2.")])
def test_mismatched_config_exit_2_names_file_and_tensor(tmp_path, capsys, change, tensor):
    exp = make_export(tmp_path / "exp", 64, None)
    other = tmp_path / "other.yaml"
    save_config(load_config(None, OVR + [change]), other)
    code, _, err = generate(capsys, exp, "--config", other, "--prompt-ids", "1,2")
    assert code == 2 and str(other) in err and tensor in err and "--config" in err
    assert len(err.strip().splitlines()) == 1
    from mgt_scale.commands.probe import main
    capsys.readouterr()
    assert main(["--config", str(other), "--checkpoint", str(exp)]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and tensor in err and "Traceback" not in err
    if change.startswith("model.d_model"):
        assert "[64, 32]" in err and "[64, 48]" in err


def test_probe_export_without_config(tmp_path):
    from mgt_scale.commands.probe import main
    exp = make_export(tmp_path / "exp", 64, None, ["model.residual=preln"])
    assert main(["--checkpoint", str(exp), "--json", str(tmp_path / "g.json")]) == 0
    assert '"residual": "preln"' in (tmp_path / "g.json").read_text()


# ------------------------------------------------------------------ vocabulary sizes
def test_model_vocab_larger_than_tokenizer_samples_tokenizer_ids(tmp_path, capsys, tok_path):
    """vocab 512 > 300 pieces: sentencepiece would raise 'piece id is out of range' on ids 300..511."""
    exp = make_export(tmp_path / "exp", 512, tok_path)
    for seed in range(3):
        code, out, err = generate(capsys, exp, "--prompt", "def f", "--max-new-tokens", "40",
                                  "--temperature", "1.5", "--seed", seed)
        assert code == 0, err
        assert out.startswith("def f")


def test_tokenizer_larger_than_model_vocab_refused(tmp_path, capsys, tok_path):
    exp = make_export(tmp_path / "exp", 256, tok_path)
    code, _, err = generate(capsys, exp, "--prompt", "x", "--max-new-tokens", "3")
    assert code == 2 and "300" in err and "256" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ exit codes and the CLI (subprocesses)
@pytest.mark.slow
def test_bad_input_exit_2(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    for args in (("generate", nowhere, "--prompt-ids", "1"), ("export", nowhere, "--output", str(tmp_path / "o")),
                 ("ckpt", "verify", nowhere), ("ckpt", "list", nowhere)):
        r = mgt(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert nowhere in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_version():
    r = mgt("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mgt {importlib.metadata.version('mgt-scale')}"


@pytest.mark.slow
@pytest.mark.parametrize("what", ["help", "ckpt list", "subcommand help"])
def test_closed_pipe_ends_quietly(tmp_path, what):
    """`mgt -h | head -1`: the reader is gone before mgt writes (closed at once here, so the test does
    not depend on timing): no BrokenPipeError traceback, exit 141."""
    if what == "help":
        args = ["-h"]
    elif what == "subcommand help":
        args = ["generate", "-h"]
    else:
        for step in range(1, 40):
            (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        args = ["ckpt", "list", str(tmp_path), "--quick"]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    p = subprocess.Popen([sys.executable, "-m", "mgt_scale.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    # argparse swallows the write error of its own help text (and the text with it): quiet exit 0
    assert rc == (0 if what == "subcommand help" else 141)


@pytest.mark.parametrize("change, key", [("model.mgt.beta_input=ln", "model.mgt.beta_input"),
                                         ("model.mgt.lam=0.5", "model.mgt.lam")])
def test_config_with_the_same_shapes_but_another_model_exit_2(tmp_path, capsys, change, key):
    """Same tensor shapes, another formula: before, generate/probe computed with it silently."""
    exp = make_export(tmp_path / "exp", 64, None)
    other = tmp_path / "other.yaml"
    save_config(load_config(None, OVR + [change]), other)
    code, _, err = generate(capsys, exp, "--config", other, "--prompt-ids", "1,2")
    assert code == 2 and key in err and str(other) in err, err
    from mgt_scale.commands.probe import main
    capsys.readouterr()
    assert main(["--checkpoint", str(exp), "--set", change]) == 2
    assert key in capsys.readouterr().err
    same = tmp_path / "same.yaml"
    save_config(load_config(None, OVR), same)
    code, _, err = generate(capsys, exp, "--config", same, "--prompt-ids", "1,2")
    assert code == 0, err


def test_config_differing_only_in_init_or_implementation_is_accepted(tmp_path, capsys):
    """Initial values (the trained weights replace them), fused vs op by op (one formula) and max_seq_len
    (rotary positions are computed) do not change what the weights compute: such a --config loads."""
    exp = make_export(tmp_path / "exp", 64, None)
    other = tmp_path / "other.yaml"
    save_config(load_config(None, OVR + ["model.init_std=0.05", "model.mgt.fused=false",
                                         "model.mgt.beta_bias_init=0.1", "model.max_seq_len=512"]), other)
    code, _, err = generate(capsys, exp, "--config", other, "--prompt-ids", "1,2")
    assert code == 0, err
