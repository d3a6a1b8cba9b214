# The model package is pure torch: importing it must not load DeepSpeed (or torch.distributed users),
# a 200-layer stack is built once, and initialisation works whatever device the parameters live on.
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_model_import_does_not_load_deepspeed():
    code = ("import sys, mgt_scale.model, mgt_scale.config; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'deepspeed']; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_200_layer_model_builds_on_meta_then_once():
    from mgt_scale.config import ModelConfig
    from mgt_scale.model import build_model, count_parameters
    m = build_model(ModelConfig(num_layers=200, d_model=32, num_heads=2, d_ff=64, vocab_size=64))
    assert len(m.blocks) == 200
    assert all(not p.is_meta for p in m.parameters())
    assert count_parameters(m) > 200 * 4 * 32 * 32


@pytest.mark.parametrize("residual,mgt", [("preln", {}), ("deepnorm", {}), ("mgt", {}),
                                          ("mgt", {"proj_rank": 4, "beta_shape": "token"}), ("ddl", {})])
def test_init_never_draws_with_a_cpu_generator_into_a_parameter(residual, mgt):
    """The seeded generators are CPU generators, and torch refuses one for a CUDA tensor ("Expected a
    'cuda' device type for generator"). Under ZeRO-3 on GPUs each unit is initialised in place on the GPU
    (mgt_scale.engine.zero.build_model_zero_init), so no initialiser may draw into a parameter with a generator: it
    draws on the CPU and copies (layers.normal_from_cpu_). CPU tensors cannot show the refusal, so every
    dispatched op that takes a generator is checked for writing into a parameter's storage."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mgt_scale.config import MGTConfig, ModelConfig
    from mgt_scale.model import MGTModel

    cfg = ModelConfig(num_layers=2, d_model=16, num_heads=2, d_ff=32, vocab_size=40, residual=residual,
                      mgt=MGTConfig(**mgt))
    with torch.device("meta"):
        model = MGTModel(cfg)
    model.to_empty(device="cpu")
    storages = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}

    class GeneratorDraws(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.draws, self.into_params = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if any(isinstance(a, torch.Generator) for a in (*args, *kwargs.values())):
                self.draws += 1
                target = args[0]
                if isinstance(target, torch.Tensor) and target.untyped_storage().data_ptr() in storages:
                    self.into_params.append((str(func), storages[target.untyped_storage().data_ptr()]))
            return func(*args, **kwargs)

    mode = GeneratorDraws()
    with mode:
        model.init_weights(seed=0)
    assert mode.draws >= 4 * cfg.num_layers  # the check saw the draws (qkv, out, up, down per block)
    assert mode.into_params == []
