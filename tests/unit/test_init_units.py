# One initialisation path (issue #29): MGTModel.init_weights, the ZeRO-3 partitioned build and the
# pipeline stages all run mgt_scale.model.init_units; a `gather` context decides per unit whether this
# process writes (ZeRO-3: rank 0 inside DeepSpeed's GatheredParameters).
from contextlib import contextmanager

import pytest
import torch

from mgt_scale.config import ModelConfig
from mgt_scale.model import MGTModel, build_model, init_units

CFG = ModelConfig(num_layers=3, d_model=16, num_heads=2, d_ff=32, vocab_size=40, max_seq_len=16)


@pytest.mark.parametrize("tie", [False, True])
def test_init_units_equals_init_weights_whatever_the_order(tie):
    import dataclasses
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    ref = build_model(cfg, seed=5).state_dict()
    model = build_model(cfg, seed=99)
    units = model.units()
    assert [i for _, i in units] == list(range(cfg.num_layers + 2))
    init_units(reversed(units), cfg, 5)  # order does not matter: one generator per unit
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    if tie:
        assert model.head.proj.weight is model.embed.tok.weight


def test_gather_context_decides_who_writes():
    seen = []

    @contextmanager
    def gather(unit):  # as ZeRO-3's: the unit made whole, then whether this rank writes it
        seen.append(type(unit).__name__)
        yield False  # a rank other than 0

    with torch.device("meta"):
        model = MGTModel(CFG)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    init_units(model.units(), CFG, 5, gather=gather)
    assert seen == ["TokenEmbedding", "Block", "Block", "Block", "Head"]
    assert all(bool((p == 7.0).all()) for p in model.parameters())  # nothing written


def test_model_package_does_not_import_deepspeed_for_init():
    import ast
    from pathlib import Path

    import mgt_scale.model as pkg
    for f in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "deepspeed" for n in names), f
