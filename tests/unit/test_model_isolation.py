# The model package is pure torch: importing it must not load DeepSpeed (or torch.distributed users).
import subprocess
import sys


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
