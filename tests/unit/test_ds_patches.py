# The one guard over our patches of DeepSpeed's code (mgt_scale/parallel/ds_patches.py): pyproject.toml
# pins the DeepSpeed version the patches were checked against, every patch fits the installed DeepSpeed,
# and the pipeline engine's two patches (clipping over all stages, skipping a non-finite step) each
# refuse to install where DeepSpeed's source is not the one checked, or under MGT_DS_PIPELINE_FIXES=0,
# with the start-up line saying so and the engine still stepping. A one-stage pipeline on one in-process
# rank; the ZeRO-3 fixes' own refusal tests are in test_ds_zero3_fixes.py.
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from mgt_scale.config import load_config
from mgt_scale.parallel import ds_patches

REPO = Path(__file__).resolve().parents[2]
PIPE = ["data.synthetic=copy", "model.num_layers=2", "model.d_model=16", "model.num_heads=2", "model.d_ff=32",
        "model.vocab_size=32", "model.max_seq_len=16", "data.seq_len=8", "monitor.interval=0",
        "train.global_batch_size=2", "train.micro_batch_size=1", "parallel.mode=pipeline",
        "parallel.pipeline_stages=1", "parallel.zero_stage=0", "parallel.precision=fp32", "train.grad_clip=1.0"]
PIPELINE_PATCHES = ["pipeline-clip-all-stages", "pipeline-nonfinite-skip"]


def test_pyproject_pins_the_version_the_patches_were_checked_against():
    import deepspeed
    pins = re.findall(r'"deepspeed([^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pins == [f"=={ds_patches.CHECKED_VERSION}"]
    assert deepspeed.__version__ == ds_patches.CHECKED_VERSION


def test_every_patch_fits_the_installed_deepspeed(monkeypatch):
    for switch in ds_patches.SWITCHES.values():
        monkeypatch.delenv(switch, raising=False)
    assert {n: ds_patches.refusal(n) for n in ds_patches.PATCHES} == {n: None for n in ds_patches.PATCHES}
    assert ds_patches.describe("pipeline") == "pipeline engine fixes: " + ", ".join(PIPELINE_PATCHES)


def test_unreadable_source_refuses():
    assert ds_patches.source_sha256(["deepspeed.runtime.engine:DeepSpeedEngine.no_such_method"]) == ""
    assert ds_patches.source_sha256(["builtins:len"]) == ""  # no Python source


def build():
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.engine.pipeline import PipelineEngine
    cfg = load_config(None, PIPE)
    return PipelineEngine(cfg, plan_batch(cfg, 1), "fp32")


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 32, (1, 8), generator=g), torch.randint(0, 32, (1, 8), generator=g)) for _ in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("refused", [None, *PIPELINE_PATCHES, "off"])
def test_pipeline_patches_install_only_when_they_fit(inprocess_dist, monkeypatch, fault_hooks, refused):
    """Each patch installed exactly when its guard allows (another recorded hash stands in for a DeepSpeed
    whose source differs); the start-up line says which; a finite step applies and a NaN step is skipped
    only where the skip is installed (measuring the norm itself when the clip patch is not there)."""
    monkeypatch.delenv("MGT_DS_PIPELINE_FIXES", raising=False)
    if refused == "off":
        monkeypatch.setenv("MGT_DS_PIPELINE_FIXES", "0")
    elif refused:
        monkeypatch.setitem(ds_patches.PATCHES, refused,
                            dataclasses.replace(ds_patches.PATCHES[refused], sha256="0" * 64))
    installed = [] if refused == "off" else [n for n in PIPELINE_PATCHES if n != refused]
    e = build()
    clip_ours = e.engine.clip_fp32_gradients == e._clip_fp32_gradients
    assert clip_ours == ("pipeline-clip-all-stages" in installed)
    assert e._guarded == ("pipeline-nonfinite-skip" in installed)
    line = ds_patches.describe("pipeline")
    if refused == "off":
        assert line == "pipeline engine fixes: off (MGT_DS_PIPELINE_FIXES=0)"
    elif refused:
        assert line == (f"pipeline engine fixes: {installed[0]}; {refused} NOT installed (DeepSpeed "
                        f"{ds_patches.CHECKED_VERSION}: " + ", ".join(
                            f.split(":")[1] for f in ds_patches.PATCHES[refused].functions)
                        + f" not the source checked (DeepSpeed {ds_patches.CHECKED_VERSION}'s))")
    first = e.train_step(batch(0))
    assert not first.skipped and math.isfinite(first.loss)
    before = [p.detach().clone() for p in e.module.parameters()]
    with fault_hooks.nan_loss():  # the engine's lm_loss NaN (tests/fault_hooks)
        nan = e.train_step(batch(1))
    assert nan.skipped == ("pipeline-nonfinite-skip" in installed)
    if nan.skipped:
        assert all(torch.equal(a, p) for a, p in zip(before, e.module.parameters()))
