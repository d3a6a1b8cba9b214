# Activation checkpointing policies (mgt_scale.model.recompute), applied from outside the model by
# mgt_scale.parallel.checkpointing.apply_activation_checkpointing: "full" and "selective" must give
# exactly the losses and gradients of no checkpointing, and "selective" must really skip recomputing
# the narrowing matmuls (counted at the dispatcher during the backward) and nothing else.
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mgt_scale.config import MGTConfig, ModelConfig, ParallelConfig, load_config
from mgt_scale.model import build_model, lm_loss
from mgt_scale.model.recompute import checkpoint_segment, narrowing_matmul
from mgt_scale.parallel.checkpointing import apply_activation_checkpointing

MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


class CountMatmuls(TorchDispatchMode):
    """Counts matmul calls, and those among them that narrow their input."""

    def __init__(self):
        super().__init__()
        self.all = self.narrowing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.all += 1
            self.narrowing += narrowing_matmul(func, args)
        return func(*args, **(kwargs or {}))


def train_step(cfg: ModelConfig, every: int, policy: str, count: bool = False):
    model = build_model(cfg, seed=11)
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=every > 0,
                                                         checkpoint_every_layers=max(every, 1), checkpoint_policy=policy))
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    fwd, bwd = CountMatmuls(), CountMatmuls()
    with fwd if count else torch.enable_grad():
        loss = lm_loss(model(tokens), tokens)
    with bwd if count else torch.enable_grad():
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, fwd, bwd


FORMS = [("mgt", {}), ("mgt", {"proj_rank": 4, "beta_shape": "token"}), ("preln", {})]


@pytest.mark.parametrize("residual,mgt", FORMS)
@pytest.mark.parametrize("every", [1, 2])
def test_policies_give_exactly_the_uncheckpointed_step(residual, mgt, every):
    cfg = ModelConfig(num_layers=4, d_model=16, num_heads=2, d_ff=64, vocab_size=40, residual=residual,
                      mgt=MGTConfig(**mgt))
    ref_loss, ref_grads, _, _ = train_step(cfg, 0, "full")
    for policy in ("full", "selective"):
        loss, grads, _, _ = train_step(cfg, every, policy)
        assert torch.equal(loss, ref_loss), policy
        for n, g in grads.items():
            assert torch.equal(g, ref_grads[n]), (policy, n)


@pytest.mark.parametrize("residual,mgt", FORMS)
def test_selective_skips_exactly_the_narrowing_matmuls_in_the_backward(residual, mgt):
    cfg = ModelConfig(num_layers=3, d_model=16, num_heads=2, d_ff=64, vocab_size=40, residual=residual,
                      mgt=MGTConfig(**mgt))
    _, _, fwd_none, bwd_none = train_step(cfg, 0, "full", count=True)
    _, _, fwd_full, bwd_full = train_step(cfg, 1, "full", count=True)
    _, _, fwd_sel, bwd_sel = train_step(cfg, 1, "selective", count=True)
    head_matmuls = 1  # the LM head runs outside the checkpointed blocks (and widens: d -> vocab)
    block_fwd, narrowing = fwd_none.all - head_matmuls, fwd_none.narrowing
    assert narrowing >= cfg.num_layers  # at least each block's FFN down-projection
    assert fwd_full.all == fwd_sel.all == fwd_none.all
    recomputed_full = bwd_full.all - bwd_none.all
    recomputed_narrowing_full = bwd_full.narrowing - bwd_none.narrowing
    # full recomputes at most every block matmul (torch may stop a segment's recomputation once it has
    # every tensor the backward needs: pre-LN's last matmul feeds only an add, so it can be skipped)
    assert 0 < recomputed_full <= block_fwd
    assert recomputed_narrowing_full in ((narrowing,) if residual == "mgt" else (0, narrowing))
    assert bwd_sel.narrowing == bwd_none.narrowing  # selective recomputes no narrowing matmul ...
    assert bwd_sel.all - bwd_none.all == recomputed_full - recomputed_narrowing_full  # ... and all the rest


def test_unknown_policy_is_an_error_naming_the_key_and_the_value():
    with pytest.raises(Exception, match="parallel.checkpoint_policy"):
        load_config(None, ["parallel.checkpoint_policy=some"])
    with pytest.raises(ValueError, match="'some'"):
        checkpoint_segment(lambda t: t * 2, torch.ones(2, requires_grad=True), policy="some")


def test_checkpointing_is_applied_from_outside_and_keeps_names_and_probe():
    """The model's forward reads no engine-set attribute; apply_activation_checkpointing changes the
    `blocks` stack in place: same parameter names, still checkpointed in a deep copy, plain in eval."""
    import copy

    from mgt_scale.model import MGTModel
    from mgt_scale.parallel.checkpointing import CheckpointedBlockStack
    cfg = ModelConfig(num_layers=3, d_model=16, num_heads=2, d_ff=64, vocab_size=40)
    model = build_model(cfg, seed=2)
    for attr in ("checkpoint_every", "checkpoint_policy", "checkpoint_fn"):
        assert not hasattr(model, attr) and not hasattr(MGTModel, attr)
    names = [n for n, _ in model.named_parameters()]
    on = ParallelConfig(activation_checkpointing=True, checkpoint_every_layers=2, checkpoint_policy="selective")
    assert not apply_activation_checkpointing(model, ParallelConfig())  # off: nothing changes
    assert type(model.blocks) is not CheckpointedBlockStack
    assert apply_activation_checkpointing(model, on)
    assert isinstance(model.blocks, CheckpointedBlockStack)
    assert (model.blocks.ckpt_every, model.blocks.ckpt_policy) == (2, "selective")
    assert [n for n, _ in model.named_parameters()] == names
    twin = copy.deepcopy(model)
    assert isinstance(twin.blocks, CheckpointedBlockStack) and twin.blocks is not model.blocks
    calls = []
    import mgt_scale.parallel.checkpointing as ckpt
    orig = ckpt.checkpoint_segment
    try:
        ckpt.checkpoint_segment = lambda fn, x, policy: calls.append(policy) or orig(fn, x, policy=policy)
        tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
        lm_loss(model(tokens), tokens).backward()
        assert calls == ["selective", "selective"]  # 3 blocks in segments of 2
        model.eval()
        with torch.no_grad():
            model(tokens)
        assert len(calls) == 2  # eval / no_grad (probe, validation): the plain loop
    finally:
        ckpt.checkpoint_segment = orig


def test_checkpointing_a_pipeline_module_sets_deepspeeds_interval_and_our_function():
    class FakePipelineModule(torch.nn.Module):  # the two attributes DeepSpeed's PipelineModule reads
        activation_checkpoint_interval = 0
        activation_checkpoint_func = None
        forward_funcs: list = []

    pipe = FakePipelineModule()
    assert apply_activation_checkpointing(pipe, ParallelConfig(activation_checkpointing=True, checkpoint_every_layers=3,
                                                               checkpoint_policy="selective"))
    assert pipe.activation_checkpoint_interval == 3
    assert pipe.activation_checkpoint_func.func is checkpoint_segment
    assert pipe.activation_checkpoint_func.keywords == {"policy": "selective"}
    with pytest.raises(TypeError, match="Linear"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), ParallelConfig(activation_checkpointing=True))
