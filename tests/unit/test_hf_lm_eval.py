# lm-evaluation-harness on an exported model: the `lm_eval` command with our task directory
# (mgt_scale/hf/tasks, task mgt_text: a local text file, no download) reports a token perplexity that
# equals our own loss on the same windows (mgt_scale/hf/text_loss.py) to rounding; `mgt eval` does the
# same from an mgt export in one command. The text is longer than the model's max length (several
# windows and a partial last one).
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from hf_helpers import tiny_model_config, train_small_tokenizer  # noqa: E402

TEXT = Path(__file__).resolve().parents[2] / "mgt_scale" / "hf" / "tasks" / "sample.txt"


@pytest.fixture(scope="module")
def mgt_export(tmp_path_factory):
    """An mgt export directory (model.safetensors, config.yaml, tokenizer.model) of a tiny MGT model."""
    from safetensors.torch import save_file
    from mgt_scale.config import Config, save_config
    from mgt_scale.model import build_model
    d = tmp_path_factory.mktemp("export")
    base = Config()
    cfg = dataclasses.replace(base, model=tiny_model_config("mgt", max_seq_len=64),
                              data=dataclasses.replace(base.data, synthetic="random", seq_len=64),
                              monitor=dataclasses.replace(base.monitor, probe_seq_len=64))
    model = build_model(cfg.model, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_file(dict(model.state_dict()), str(d / "model.safetensors"))
    save_config(cfg, d / "config.yaml")
    train_small_tokenizer(d / "tokenizer.model")
    return d


def ours(export_dir: Path) -> tuple[float, int]:
    from mgt_scale.data.tokenizer import Tokenizer
    from mgt_scale.hf.text_loss import stream_nll
    from mgt_scale.train.model_source import open_model
    src = open_model(export_dir)
    tok = Tokenizer(export_dir / "tokenizer.model")
    nll, n = stream_nll(src.model, tok.encode(TEXT.read_text()), tok.eos_id, src.cfg.model.max_seq_len)
    assert n > 3 * src.cfg.model.max_seq_len and n % src.cfg.model.max_seq_len  # windows + a partial one
    return nll / n, n


@pytest.mark.slow
def test_lm_eval_command_matches_our_loss(mgt_export, tmp_path):
    from mgt_scale.hf.export_hf import export_hf
    hf_dir = export_hf(mgt_export, tmp_path / "hf", log=lambda *a: None)
    tasks = Path(__file__).resolve().parents[2] / "mgt_scale" / "hf" / "tasks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    p = subprocess.run([str(lm_eval), "--model", "hf", "--model_args", f"pretrained={hf_dir},trust_remote_code=True",
                        "--tasks", "mgt_text", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
                        "--metadata", json.dumps({"text_file": str(TEXT)}), "--output_path", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(tmp_path / "out" / "**" / "results*.json"), recursive=True)[0]).read_text())
    ppl = results["results"]["mgt_text"]["token_perplexity,none"]
    loss, n = ours(mgt_export)
    assert ppl == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.slow
def test_mgt_eval_command(mgt_export, tmp_path, capsys):
    from mgt_scale.commands.main import main
    assert main(["eval", str(mgt_export), "--text", str(TEXT), "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    loss, n = ours(mgt_export)
    assert r["tokens"] == n and r["mgt_loss"] == pytest.approx(loss, rel=1e-6)
    assert r["lm_eval"]["token_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert "loss" in capsys.readouterr().out
    assert main(["eval", str(mgt_export), "--text", str(tmp_path / "missing.txt")]) == 2
