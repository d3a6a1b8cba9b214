# data.copy_loss (issue #33's copy task): with `copied` the training and validation loss of both engines
# (ZeRO-3 and pipeline, one in-process rank, fp32 CPU) is the mean cross-entropy over the copied half only,
# checked against an independent fp64 computation on a tiny batch; the positions outside it get exactly
# zero gradient (scrambling their targets changes neither the loss nor the update); the default `all`
# keeps the whole-sequence loss; `copied` without the copy task is refused.
import pytest
import torch

from mgt_scale.config import ConfigError, load_config
from mgt_scale.data.synthetic import copy_task_mask, loss_mask_fn
from mgt_scale.model import build_model, lm_loss

SEQ, VOCAB = 8, 12
BASE = ["data.synthetic=copy", f"data.seq_len={SEQ}", "data.prefetch=0", f"model.vocab_size={VOCAB}",
        "model.num_layers=2", "model.d_model=16", "model.num_heads=2", "model.d_ff=32", "model.max_seq_len=16",
        "monitor.interval=0", "train.global_batch_size=2", "train.micro_batch_size=2", "parallel.precision=fp32"]


def copy_batch(seed=0, b=2):
    """Copy-task samples (inputs, targets) as the data source writes them: x, SEP, x."""
    from mgt_scale.data.synthetic import CopyTaskSource
    import numpy as np
    s = torch.from_numpy(CopyTaskSource(SEQ, VOCAB, seed).get(np.arange(b)))
    return s[:, :-1].contiguous(), s[:, 1:].contiguous()


def hand_loss(model, x, y, positions):
    """Mean of -log softmax(logits)[target] over `positions` (fp64, written out)."""
    with torch.no_grad():
        z = model(x).double()[:, positions]
        t = y[:, positions]
        lse = torch.log(torch.exp(z - z.max(-1, keepdim=True).values).sum(-1)) + z.max(-1).values
        return float((lse - z.gather(-1, t[..., None]).squeeze(-1)).mean())


def test_mask_selects_copied_half_and_config_picks_it():
    x, y = copy_batch()
    m = copy_task_mask(y)
    n = SEQ // 2
    assert m[:, n:2 * n].all() and not m[:, :n].any()
    assert torch.equal(y[:, n:2 * n], x[:, :n])  # those targets are the copy of the first half
    assert loss_mask_fn(load_config(None, BASE + ["data.copy_loss=copied"]).data) is copy_task_mask
    assert loss_mask_fn(load_config(None, BASE).data) is None


def test_masked_lm_loss_gives_zero_gradient_outside_the_copied_half():
    _, y = copy_batch()
    logits = torch.randn(2, SEQ, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    loss = lm_loss(logits, y, copy_task_mask(y))
    n = SEQ // 2
    ref = -torch.log_softmax(logits.detach(), -1).gather(-1, y[..., None]).squeeze(-1)[:, n:2 * n].mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6)  # lm_loss computes in fp32
    loss.backward()
    assert torch.count_nonzero(logits.grad[:, :n]) == 0
    assert torch.count_nonzero(logits.grad[:, n:2 * n]) == logits.grad[:, n:2 * n].numel()


def test_config_refuses_copied_loss_without_copy_task_and_bad_values():
    with pytest.raises(ConfigError, match="data.copy_loss"):
        load_config(None, ["data.synthetic=random", "data.copy_loss=copied"])
    with pytest.raises(ConfigError, match="data.copy_loss"):
        load_config(None, BASE + ["data.copy_loss=half"])


def _engine(mode, copy_loss):
    """The engine `mgt train` builds: the default mode (ZeRO-3) or the pipeline engine with one stage."""
    from mgt_scale.engine import build_engine
    from mgt_scale.parallel.topology import plan_batch
    sets = BASE + [f"data.copy_loss={copy_loss}"]
    if mode == "pipeline":
        sets += ["parallel.mode=pipeline", "parallel.zero_stage=0", "parallel.pipeline_stages=1"]
    cfg = load_config(None, sets)
    e = build_engine(cfg, plan_batch(cfg, 1), "fp32")
    assert (mode == "pipeline") == (type(e).__name__ == "PipelineEngine")
    e.set_lr(1e-2)
    return cfg, e


def _params(e):
    from mgt_scale.parallel.convert import consolidated_state_dict
    return consolidated_state_dict(e)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "pipeline"])
def test_engine_loss_is_copied_half_only(inprocess_dist, mode):
    x, y = copy_batch()
    n = SEQ // 2
    cfg, e = _engine(mode, "copied")
    ref_model = build_model(cfg.model, seed=cfg.train.seed).eval()  # the engine's initial weights
    copied, whole = hand_loss(ref_model, x, y, slice(n, 2 * n)), hand_loss(ref_model, x, y, slice(0, SEQ))
    assert abs(copied - whole) > 100 * 2e-6 * whole  # the two losses differ on this batch (at init: by 9e-4)
    assert e.eval_loss([(x, y)]) == pytest.approx(copied, rel=2e-6)
    r = e.train_step([(x, y)])
    assert r.loss == pytest.approx(copied, rel=2e-6)

    # targets outside the copied half get no gradient: scrambling them leaves loss and update unchanged
    y2 = y.clone()
    y2[:, :n] = (y2[:, :n] + 5) % (VOCAB - 1)
    _, e2 = _engine(mode, "copied")
    r2 = e2.train_step([(x, y2)])
    assert r2.loss == r.loss
    p1, p2 = _params(e), _params(e2)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)

    # the validation loss after the step: the copied half of the updated model
    ref_model.load_state_dict(p1)
    after, after_whole = hand_loss(ref_model, x, y, slice(n, 2 * n)), hand_loss(ref_model, x, y, slice(0, SEQ))
    assert abs(after - after_whole) > 100 * 2e-6 * after_whole
    assert e.eval_loss([(x, y)]) == pytest.approx(after, rel=2e-6)

    # the default: the whole sequence, as before
    _, e3 = _engine(mode, "all")
    assert e3.train_step([(x, y)]).loss == pytest.approx(whole, rel=1e-5)
