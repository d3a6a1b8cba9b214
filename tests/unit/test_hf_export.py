# `mgt export --format hf`: the directory loads in transformers with no mgt-scale importable, its logits
# equal ours (fp32, 1e-5) for every residual kind, generate() works with the cache (greedy: the same
# tokens as without the cache and as `mgt generate`'s sampler; sampling), the model code is
# mgt_scale/model's own (import rewriting refuses what it cannot carry), and the CLI's exit codes.
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import run_isolated, tiny_model_config, train_small_tokenizer  # noqa: E402
from mgt_scale.config import RESIDUAL_KINDS  # noqa: E402

# every residual kind, plus MGT with low-rank projections, per-token beta and a tied head, and MGT with
# beta reading LN(X) (model.mgt.beta_input: ln)
VARIANTS = {k: {} for k in RESIDUAL_KINDS}
VARIANTS["mgt_lowrank_tied"] = {"residual": "mgt", "tie_embeddings": True,
                                "mgt": {"proj_rank": 4, "beta_shape": "token", "alpha_shape": "channel"}}
VARIANTS["mgt_beta_ln"] = {"residual": "mgt", "mgt": {"beta_input": "ln"}}  # beta reads LN(X): config.json carries it

LOAD = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for d in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(d)
    ref = json.load(open(d + "/ref.json"))
    x = torch.tensor(ref["input"])
    with torch.no_grad():
        logits = model(x).logits
        cached = model(x, use_cache=True).logits
    prompt = torch.tensor([ref["prompt"]])
    g_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True)[0, prompt.shape[1]:]
    g_nocache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)[0, prompt.shape[1]:]
    torch.manual_seed(0)
    s = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0)[0, prompt.shape[1]:]
    out[d] = {"max_diff": float((logits - torch.tensor(ref["logits"])).abs().max()),
              "cached_diff": float((cached - logits).abs().max()),
              "greedy_cache": g_cache.tolist(), "greedy_nocache": g_nocache.tolist(), "sampled": s.tolist(),
              "tokenizer": type(tok).__name__, "eos": tok.eos_token_id,
              "dtype": str(model.dtype), "class": type(model).__name__}
out["mgt_scale_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "mgt_scale")
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every variant exported (with its reference logits and greedy tokens from mgt_scale), then loaded
    in one isolated transformers process."""
    from mgt_scale.hf.export_hf import write_hf
    from mgt_scale.model import build_model
    from mgt_scale.train.sampling import sample
    root = tmp_path_factory.mktemp("hf")
    tok = train_small_tokenizer(root / "tokenizer.model")
    dirs, refs = {}, {}
    for name, over in VARIANTS.items():
        over = dict(over)
        cfg = tiny_model_config(over.pop("residual", name), **over)
        model = build_model(cfg, seed=3).eval()
        if cfg.residual != "deepnorm":  # make the residual operators' parameters non-trivial
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        d = root / name
        write_hf(model, cfg, root / "tokenizer.model", d, log=lambda *a: None)
        x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
        prompt = tok.encode("def main(argv):\n    return ")
        with torch.no_grad():
            logits = model(x)
        greedy = sample(model, prompt, 20, 0.0, 0, cfg.max_seq_len)
        (d / "ref.json").write_text(json.dumps({"input": x.tolist(), "logits": logits.tolist(), "prompt": prompt}))
        dirs[name], refs[name] = d, {"greedy": greedy, "vocab": cfg.vocab_size}
    res = run_isolated(LOAD, *[str(d) for d in dirs.values()], cwd=root)
    return {name: {**res[str(d)], **refs[name]} for name, d in dirs.items()}, res["mgt_scale_modules"]


@pytest.mark.slow
def test_no_mgt_scale_needed(exported):
    assert exported[1] == []


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_ours(exported, variant):
    r = exported[0][variant]
    assert r["class"] == "MGTForCausalLM" and r["dtype"] == "torch.float32"
    assert r["max_diff"] <= 1e-5, r["max_diff"]
    assert r["cached_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_cached_equals_uncached_and_ours(exported, variant):
    r = exported[0][variant]
    assert len(r["greedy_cache"]) == 20
    assert r["greedy_cache"] == r["greedy_nocache"]
    assert r["greedy_cache"] == r["greedy"]  # mgt generate's sampler (mgt_scale.train.sampling), greedy
    assert len(r["sampled"]) >= 1 and all(0 <= t < r["vocab"] for t in r["sampled"])
    assert r["tokenizer"] and r["eos"] == 1


def test_export_carries_model_source(tmp_path):
    """The model files are mgt_scale/model's, imports made relative; nothing else of mgt_scale."""
    from mgt_scale.hf.export_hf import MODEL_SRC, model_files
    files = model_files()
    for p in MODEL_SRC.glob("*.py"):
        if p.name == "__init__.py":
            continue
        body = files[p.name].split("\n", 1)[1]
        assert body.replace("from .", "from mgt_scale.model.").replace(
            "from mgt_scale.model.configuration_mgt", "from mgt_scale.config") == p.read_text() or "from . import" in body
        assert "mgt_scale" not in "".join(l for l in body.splitlines() if l.lstrip().startswith(("from", "import")))


def test_rewrite_refuses_what_it_cannot_carry():
    from mgt_scale.hf.export_hf import HFExportError, rewrite_source
    assert "from .layers import LayerKV" in rewrite_source("x.py", "from mgt_scale.model.layers import LayerKV\n")
    assert "from .configuration_mgt import ModelConfig" in rewrite_source("x.py", "from mgt_scale.config import ModelConfig\n")
    with pytest.raises(HFExportError, match="RESIDUAL_KINDS"):
        rewrite_source("x.py", "from mgt_scale.config import ModelConfig, RESIDUAL_KINDS\n")
    with pytest.raises(HFExportError, match="mgt_scale.train"):
        rewrite_source("x.py", "from mgt_scale.train.flops import x\n")


@pytest.mark.slow
def test_cli_format_hf(tmp_path, capsys):
    """`mgt export EXPORT_DIR --output DIR --format hf` from an mgt export; a bad source exits 2."""
    from safetensors.torch import save_file
    from mgt_scale.config import Config, save_config
    from mgt_scale.model import build_model
    from mgt_scale.commands.export import main
    import dataclasses
    base = Config()
    cfg = dataclasses.replace(base, model=tiny_model_config("mgt", max_seq_len=128),
                              data=dataclasses.replace(base.data, synthetic="random"))
    src = tmp_path / "export"
    src.mkdir()
    save_file(dict(build_model(cfg.model).state_dict()), str(src / "model.safetensors"))
    save_config(cfg, src / "config.yaml")
    train_small_tokenizer(src / "tokenizer.model")
    assert main([str(src), "--output", str(tmp_path / "hf"), "--format", "hf"]) == 0
    for f in ("config.json", "modeling_mgt.py", "configuration_mgt.py", "transformer.py", "residual.py",
              "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / f).is_file(), f
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["mgt_model"]["residual"] == "mgt" and conf["auto_map"]["AutoModelForCausalLM"]
    assert main([str(tmp_path / "nothing"), "--output", str(tmp_path / "x"), "--format", "hf"]) == 2
    assert "no such file" in capsys.readouterr().err
