# A real ZeRO-3 checkpoint (one in-process rank, fp32 CPU) written by CheckpointManager: it verifies;
# a deleted shard or a flipped byte is rejected with the file named (`mgt ckpt verify` exits 2,
# `mgt ckpt list` shows it damaged, find_resume falls back to the older good one); the RNG file loads
# with weights_only=True; and `mgt export` gives a model.safetensors that plain torch loads with the
# training model's logits (1e-5), then `mgt generate` samples from it; a checkpoint whose recorded parameter
# layout is not the model's (another layout, or none: mgt-scale 0.1) is refused before anything loads.
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mgt_scale.config import load_config

pytestmark = pytest.mark.slow  # a DeepSpeed engine trained in-process, `mgt` subprocesses

OVR = ["data.synthetic=copy", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
       "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16", "monitor.interval=0",
       "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.precision=fp32"]


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict:
    """The environment without this process's one-rank torchrun variables (set by `inprocess_dist`)."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def mgt(*args):
    return subprocess.run([sys.executable, "-m", "mgt_scale.cli", *args], capture_output=True, text=True,
                          timeout=300, env=clean_env())


@pytest.fixture(scope="module")
def saved(tmp_path_factory, inprocess_dist):
    from mgt_scale.config import save_config
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.checkpoint.manager import CheckpointManager
    from mgt_scale.engine.zero import ZeroEngine
    run_dir = tmp_path_factory.mktemp("ckrun")
    cfg = load_config(None, OVR + [f"run.dir={run_dir}"])
    save_config(cfg, run_dir / "config.yaml")
    e = ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")
    g = torch.Generator().manual_seed(0)
    mgr = CheckpointManager(str(run_dir), cfg, 0, 1)
    for step in (1, 2):
        e.train_step([(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))])
        mgr.save(e, step, {"loader": {"consumed_samples": 4 * step}})
    x = torch.randint(0, 64, (3, 16), generator=g)
    e.engine.eval()
    with torch.no_grad():
        logits = e.engine(x).float().clone()
    return run_dir, mgr, x, logits


def test_good_checkpoint_verifies_and_rng_is_weights_only(saved):
    from mgt_scale.checkpoint.manifest import verify_checkpoint
    run_dir, mgr, _, _ = saved
    tag = run_dir / "checkpoints" / "step_00000002"
    assert verify_checkpoint(tag) == []
    rng = torch.load(tag / "rng_rank00000.pt", weights_only=True)["rng"]
    assert set(rng) >= {"python", "numpy", "torch"}
    r = mgt("ckpt", "verify", str(tag))
    assert r.returncode == 0 and "ok" in r.stdout
    r = mgt("ckpt", "list", str(run_dir))
    assert r.returncode == 0 and "step_00000002" in r.stdout and "good" in r.stdout and "latest_good" in r.stdout


def test_export_matches_training_logits_and_generates(saved, tmp_path):
    run_dir, _, x, logits = saved
    out = tmp_path / "export"
    r = mgt("export", str(run_dir), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    # plain torch in a fresh interpreter: no DeepSpeed
    code = ("import sys, torch; from mgt_scale.train.export import load_exported; "
            f"m, cfg = load_exported({str(out)!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r}); "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    torch.save(x, tmp_path / "x.pt")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    err = (y - logits).abs().max().item()
    print(f"export vs training logits: max abs diff {err:.3g}")
    assert err <= 1e-5
    from safetensors.torch import load_file
    names = load_file(str(out / "model.safetensors")).keys()
    assert all(n.split(".")[0] in ("embed", "blocks", "head") for n in names)
    r = mgt("export", str(run_dir), "--output", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    r = mgt("generate", str(out), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().split(",")) == 5
    r = mgt("generate", str(out), "--prompt", "hello")
    assert r.returncode == 2 and "tokenizer.model" in r.stderr


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_damaged_checkpoint_rejected_naming_file(saved, tmp_path, damage):
    from mgt_scale.checkpoint.manager import CheckpointManager
    from mgt_scale.checkpoint.manifest import verify_checkpoint
    run_dir, mgr, _, _ = saved
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    tag = copy / "checkpoints" / "step_00000002"
    shard = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "delete":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    problems = verify_checkpoint(tag)
    assert len(problems) == 1 and str(shard) in problems[0]
    assert ("missing" if damage == "delete" else "sha256 mismatch") in problems[0]
    r = mgt("ckpt", "verify", str(tag))
    assert r.returncode == 2 and str(shard) in r.stdout  # bad input: CONFIG_ERROR
    r = mgt("ckpt", "list", str(copy))
    line = next(l for l in r.stdout.splitlines() if l.startswith("step_00000002"))
    assert "damaged" in line and shard.name in line
    logs = []
    m2 = CheckpointManager(str(copy), mgr.cfg, 0, 1)
    assert m2.find_resume(log=logs.append) == copy / "checkpoints" / "step_00000001"
    assert any(shard.name in l for l in logs)


def test_checkpoint_of_another_parameter_layout_is_refused_before_loading(saved, tmp_path):
    """ZeRO's flat state of the same total size would load into renamed or reordered parameters without
    an error (mgt-scale 0.1 checkpoints resumed with 0.2's packed `vectors` did so, with other losses):
    the recorded layout is compared first, and a mismatch or a missing record names the parameter."""
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.checkpoint.manager import CheckpointManager
    from mgt_scale.checkpoint.manifest import CheckpointError
    from mgt_scale.engine.zero import ZeroEngine
    from mgt_scale.train.optim import param_layout
    run_dir, mgr, _, _ = saved
    tag = run_dir / "checkpoints" / "step_00000002"
    recorded = torch.load(tag / "rng_rank00000.pt", weights_only=True)["param_layout"]
    by_name = {n: (g, s) for g, n, s in recorded}
    assert by_name["blocks.0.attn_res.vectors"] == (1, [5 * 32 + 1])  # 2 LNs (4 d), b_beta (d), scalar alpha
    assert by_name["blocks.0.attn_res.gate_beta"] == (0, [2 * 32, 32])

    cfg = load_config(None, OVR + [f"run.dir={tmp_path}", "model.mgt.alpha_shape=channel"])
    other = ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")
    with pytest.raises(CheckpointError) as e:
        CheckpointManager(str(run_dir), cfg, 0, 1).load(other, tag)
    msg = str(e.value)
    assert str(tag) in msg and "blocks.0.attn_res.vectors [161] (group 1)" in msg and "[192]" in msg, msg
    assert len(param_layout(other.module)) == len(recorded)

    copy = tmp_path / "old"  # as written by mgt-scale 0.1: the rank file holds the RNG state only
    shutil.copytree(tag, copy)
    rng_file = copy / "rng_rank00000.pt"
    torch.save({"rng": torch.load(rng_file, weights_only=True)["rng"]}, rng_file)
    with pytest.raises(CheckpointError, match="records no parameter layout.*mgt export"):
        mgr.load(other, copy)
