# The optimizer (mgt_scale/train/optim.py): weight decay only on matrices, and `train.fused_adamw` (torch's
# fused AdamW kernel, the default) giving the same training trajectory as the per-tensor loop it replaced.
import copy

import torch

from mgt_scale.config import ModelConfig, TrainConfig
from mgt_scale.model import build_model, lm_loss
from mgt_scale.train.optim import build_optimizer


def _model():
    cfg = ModelConfig(num_layers=2, d_model=16, num_heads=2, d_ff=32, vocab_size=40, residual="mgt")
    return build_model(cfg, seed=1)


def test_decay_only_on_matrices_and_fused_by_default():
    model = _model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["fused"] is True
    assert not build_optimizer(model, TrainConfig(fused_adamw=False)).defaults["fused"]


def test_fused_and_loop_adamw_train_the_same():
    """Five steps with each implementation from the same weights and batches: losses and weights agree to
    fp32 rounding (the fused kernel orders its arithmetic differently, so bitwise equality is not expected)."""
    tokens = torch.randint(0, 40, (5, 3, 9), generator=torch.Generator().manual_seed(2))
    start = _model()
    results = []
    for fused in (True, False):
        model = copy.deepcopy(start)
        opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1, fused_adamw=fused))
        losses = []
        for batch in tokens:
            loss = lm_loss(model(batch), batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results.append((losses, model.state_dict()))
    (l_fused, w_fused), (l_loop, w_loop) = results
    assert l_fused[0] == l_loop[0] and l_fused[-1] < l_fused[0]
    torch.testing.assert_close(torch.tensor(l_fused), torch.tensor(l_loop), rtol=1e-5, atol=1e-6)
    moved = 0
    for name, w in w_fused.items():
        torch.testing.assert_close(w, w_loop[name], rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(w, start.state_dict()[name]))
    assert moved == len(w_fused)
