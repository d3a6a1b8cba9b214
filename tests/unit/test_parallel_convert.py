# Canonical <-> pipeline parameter names, and the pipe wrappers' per-unit initialisation (it must give
# the same weights as MGTModel.init_weights, whatever stage builds a unit). One process, no DeepSpeed
# engine: the wrappers are plain modules.
import pytest
import torch

from mgt_scale.config import ModelConfig
from mgt_scale.model import build_model
from mgt_scale.parallel import convert
from mgt_scale.parallel.pipeline import BlockPipe, EmbeddingPipe, HeadNormPipe, HeadPipe, tied_lm_head

CFG = ModelConfig(num_layers=3, d_model=16, num_heads=2, d_ff=32, vocab_size=40, max_seq_len=16)
SEED = 7


def pipe_state(cfg: ModelConfig) -> dict:
    """What a PipelineModule's merged stage state dicts would hold (layer index prefixes)."""
    sd = {}
    layers = [EmbeddingPipe(cfg, SEED), *(BlockPipe(cfg, i, SEED) for i in range(cfg.num_layers))]
    if cfg.tie_embeddings:
        for k, v in layers[0].state_dict().items():
            sd[f"tied_modules.embed.{k}"] = v
        for i, layer in enumerate(layers[1:], start=1):
            sd.update({f"{i}.{k}": v for k, v in layer.state_dict().items()})
        sd.update({f"{cfg.num_layers + 1}.{k}": v for k, v in HeadNormPipe(cfg).state_dict().items()})
    else:
        layers.append(HeadPipe(cfg, SEED))
        for i, layer in enumerate(layers):
            sd.update({f"{i}.{k}": v for k, v in layer.state_dict().items()})
    return sd


@pytest.mark.parametrize("tie", [False, True])
def test_pipe_init_equals_model_init(tie):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    ref = build_model(cfg, seed=SEED).state_dict()
    canon = convert.pipe_to_canonical(cfg, pipe_state(cfg))
    assert sorted(canon) == sorted(ref)
    for k in ref:
        assert torch.equal(canon[k], ref[k]), k


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip(tie):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    ref = build_model(cfg, seed=SEED).state_dict()
    pipe = convert.canonical_to_pipe(cfg, ref)
    assert sorted(pipe) == sorted(pipe_state(cfg))
    back = convert.pipe_to_canonical(cfg, pipe)
    assert sorted(back) == sorted(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_layer_index_mapping():
    assert convert.pipe_layer_to_canonical(CFG, 0) == "embed"
    assert convert.pipe_layer_to_canonical(CFG, 1) == "blocks.0"
    assert convert.pipe_layer_to_canonical(CFG, 3) == "blocks.2"
    assert convert.pipe_layer_to_canonical(CFG, 4) == "head"
    with pytest.raises(KeyError):
        convert.pipe_layer_to_canonical(CFG, 5)
    assert convert.canonical_to_pipe_layer(CFG, "blocks.2.attn.qkv.weight") == (3, "attn.qkv.weight")
    with pytest.raises(KeyError):
        convert.canonical_to_pipe_layer(CFG, "bogus.weight")


def test_pipe_forward_matches_model():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True})
    model = build_model(cfg, seed=SEED)
    emb = EmbeddingPipe(cfg, SEED)
    blocks = [BlockPipe(cfg, i, SEED) for i in range(cfg.num_layers)]
    norm = HeadNormPipe(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    x = emb(tokens)
    for b in blocks:
        x = b(x)
    logits = tied_lm_head(emb, norm(x))
    torch.testing.assert_close(logits, model(tokens), rtol=0, atol=0)
