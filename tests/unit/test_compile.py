# Regional torch.compile (`parallel.compile: blocks`, mgt_scale/parallel/compile.py) on the CPU (inductor):
# the compiled blocks give the reference's outputs and gradients (the paper's formulas op by op, eager) to
# 1e-6 in fp32 (each parameter's own gradient to 1e-5, see assert_matches), also under activation
# checkpointing and through the ZeRO-3 engine; every block shares one compiled graph without graph breaks;
# the monitor's probe and KV-cache decoding take the eager forward; the config refuses compile with
# per-module ZeRO-3 fetch, and ignores the retired `model.mgt.cpu_kernel` with a warning. Compiling takes
# 20-120 s per residual form on a shared 2-core CPU (seconds from a warm inductor cache): slow tests.
import pytest
import torch

from mgt_scale.config import ConfigError, MGTConfig, ModelConfig, load_config
from mgt_scale.model import KVCache, ResidualOp, build_model, lm_loss
from mgt_scale.parallel.compile import compile_blocks

FORMS = {"mgt full": ("mgt", {}), "mgt r=4 token beta": ("mgt", {"proj_rank": 4, "beta_shape": "token"}),
         "preln": ("preln", {})}


def tiny_model(residual: str, mgt: dict, fused: bool = True, layers: int = 3):
    cfg = ModelConfig(num_layers=layers, d_model=32, num_heads=2, d_ff=64, vocab_size=50, max_seq_len=16,
                      residual=residual, mgt=MGTConfig(fused=fused, **mgt))
    model = build_model(cfg, seed=3)
    with torch.no_grad():  # move alpha off its zero init, so the alpha X term is exercised
        for op in (m for m in model.modules() if isinstance(m, ResidualOp) and m.use_beta):
            op.alpha.copy_(torch.linspace(-0.4, 0.6, op.alpha.numel()))
    return cfg, model


def step(model, checkpoint: str = ""):
    """Logits and every parameter's gradient of one LM-loss forward and backward."""
    if checkpoint:
        from mgt_scale.config import ParallelConfig
        from mgt_scale.parallel.checkpointing import apply_activation_checkpointing
        apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=True, checkpoint_policy=checkpoint))
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    logits = model(tokens)
    lm_loss(logits, tokens).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def normwise(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (2-norm over all entries, in fp64)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_matches(got, ref) -> None:
    """Outputs to 1e-6 and the whole gradient (all parameters as one vector) to 1e-6, normwise; each
    parameter's gradient to 1e-5, the bound the eager fused path is held to (test_model_residual.py): the
    fp32 reference is itself 1.3e-6 from an fp64 run on the packed vectors of the token-beta form, whose
    b_beta and alpha gradients are sums over every token with cancellation."""
    (out, grads), (out_ref, grads_ref) = got, ref
    assert normwise(out, out_ref) <= 1e-6
    names = sorted(grads_ref)
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in names])  # noqa: E731
    assert normwise(flat(grads), flat(grads_ref)) <= 1e-6
    worst = max(names, key=lambda n: normwise(grads[n], grads_ref[n]))
    assert normwise(grads[worst], grads_ref[worst]) <= 1e-5, worst


@pytest.mark.slow
@pytest.mark.parametrize("form", list(FORMS))
def test_compiled_blocks_give_the_reference_outputs_and_gradients(form):
    import torch._dynamo.utils as dynamo_utils
    residual, mgt = FORMS[form]
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    ref = step(tiny_model(residual, mgt, fused=False)[1])
    _, model = tiny_model(residual, mgt)
    assert compile_blocks(model) == 3
    assert_matches(step(model), ref)
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    # the three identical blocks share one graph: compiled once, not once per block
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_compiled_blocks_under_activation_checkpointing(policy):
    residual, mgt = FORMS["mgt full"]
    ref = step(tiny_model(residual, mgt, fused=False)[1])
    _, model = tiny_model(residual, mgt)
    compile_blocks(model)
    assert_matches(step(model, checkpoint=policy), ref)


@pytest.mark.slow
def test_probe_and_kv_cache_take_the_eager_forward():
    from mgt_scale.monitor.probe import capture_probe
    residual, mgt = FORMS["mgt full"]
    cfg, eager = tiny_model(residual, mgt)
    _, model = tiny_model(residual, mgt)
    compile_blocks(model)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    hiddens, ops = capture_probe(model, tokens)
    hiddens_eager, ops_eager = capture_probe(eager, tokens)
    assert len(ops) == len(ops_eager) == 2 * cfg.num_layers
    for a, b in zip(hiddens, hiddens_eager):
        assert torch.equal(a, b)  # the eager forward: bit for bit
    with torch.no_grad():
        cache, cache_eager = KVCache(cfg.num_layers), KVCache(cfg.num_layers)
        for part in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:]):
            assert torch.equal(model(part, cache=cache), eager(part, cache=cache_eager))
        assert cache.length == 9


def test_compile_option_refused_with_per_module_zero3_fetch(tmp_path):
    base = tmp_path / "c.yaml"
    base.write_text("data:\n  synthetic: random\n")
    assert load_config(base, ["parallel.compile=blocks"]).parallel.compile == "blocks"
    with pytest.raises(ConfigError, match="parallel.compile.*zero3_fetch=block"):
        load_config(base, ["parallel.compile=blocks", "parallel.zero3_fetch=module"])
    with pytest.raises(ConfigError, match="parallel.compile"):
        load_config(base, ["parallel.compile=model"])


def test_compile_none_leaves_the_model_eager():
    _, model = tiny_model("mgt", {})
    forwards = [b.forward for b in model.blocks]
    assert compile_blocks(model, "none") == 0
    assert [b.forward for b in model.blocks] == forwards


ZERO3 = ["data.synthetic=copy", "model.num_layers=3", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
         "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16", "monitor.interval=0",
         "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.precision=fp32"]


def zero3_run(extra=(), steps=3):
    """Three steps of the ZeRO-3 engine (one in-process rank): losses, gradient norms, consolidated weights."""
    from mgt_scale.parallel.convert import consolidated_state_dict
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.engine.zero import ZeroEngine
    cfg = load_config(None, ZERO3 + list(extra))
    e = ZeroEngine(cfg, plan_batch(cfg, 1), "fp32")
    e.set_lr(1e-2)
    g = torch.Generator().manual_seed(0)
    results = []
    for _ in range(steps):
        mb = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
              for _ in range(2)]
        r = e.train_step(mb)
        results.append((r.loss, r.grad_norm))
    return e, results, consolidated_state_dict(e)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("parallel.activation_checkpointing=true",)], ids=["plain", "ckpt"])
def test_zero3_engine_with_compiled_blocks_trains_like_eager(inprocess_dist, extra):
    """Under ZeRO-3's parameter fetch and release (block leaves): the compiled blocks see the gathered
    parameters in the forward and in the backward, and three steps give eager's losses (1e-6), gradient norms
    (1e-5) and weights (1e-3: AdamW's first steps divide each gradient entry by its own magnitude, so
    rounding-level differences in near-zero entries become whole lr-sized updates; with the live gate/beta
    init the weights came out 1.1e-5 and 2.0e-4 apart normwise in two runs; a block that saw wrong
    parameters moves the losses and the weights by O(1))."""
    _, r_eager, w_eager = zero3_run(extra)
    e, r_comp, w_comp = zero3_run(("parallel.compile=blocks", *extra))
    assert all(getattr(b, "_mgt_eager_forward", None) is not None for b in e.module.blocks)
    for (l0, n0), (l1, n1) in zip(r_eager, r_comp):
        assert l1 == pytest.approx(l0, rel=1e-6) and n1 == pytest.approx(n0, rel=1e-5)
    for k in w_eager:
        assert normwise(w_comp[k], w_eager[k]) <= 1e-3, k


def test_retired_cpu_kernel_key_is_accepted_and_ignored(tmp_path, capsys):
    """Configs of earlier versions (and the config.yaml in every run directory, which `--resume` reads) hold
    `model.mgt.cpu_kernel`: they load, with a warning unless it is the old default (true), and the key is
    gone from the resolved config."""
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  mgt:\n    cpu_kernel: false\n    fused: true\ndata:\n  synthetic: random\n")
    cfg = load_config(old, ["model.mgt.cpu_kernel=false"])
    assert not hasattr(cfg.model.mgt, "cpu_kernel") and cfg.model.mgt.fused
    err = capsys.readouterr().err
    assert f"{old}: model.mgt.cpu_kernel is ignored" in err and "--set model.mgt.cpu_kernel=false" in err
