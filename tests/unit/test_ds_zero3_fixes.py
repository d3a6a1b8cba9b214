# The two copy-saving fixes to DeepSpeed's ZeRO-3 optimizer (mgt_scale/parallel/ds_zero3_fixes.py) must
# not change a number: training with them on and off gives bit-identical losses, gradient norms and
# weights (gradient accumulation and clipping active), a checkpoint written either way resumes the
# other way exactly, and each fix really does what it claims (one storage for the model's partition and
# the fp32 master; no flatten of the gradient in step()). Each goes through ds_patches' guard: it
# refuses to install, and the start-up line says so, where DeepSpeed's source is not the one checked.
# One in-process rank, fp32 CPU (and one bf16 run of a tiny model); the 2-rank on/off comparison is in
# tests/distributed/test_zero3_ranks.py; the pipeline engine's patches in test_ds_patches.py.
import pytest
import torch

from mgt_scale.config import load_config
from mgt_scale.parallel import ds_zero3_fixes
from mgt_scale.parallel.ds_zero3_fixes import contiguous_run

BASE = ["data.synthetic=copy", "model.num_layers=3", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
        "model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=16", "monitor.interval=0",
        "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.precision=fp32",
        "train.grad_clip=0.05"]  # small enough that every step is clipped: clipping scales the gradient in place


def test_contiguous_run_is_the_concatenation_without_a_copy():
    buf = torch.arange(10.0)
    parts = [buf.narrow(0, 1, 3), buf.narrow(0, 4, 2), buf.narrow(0, 6, 4)]
    run = contiguous_run(parts)
    assert torch.equal(run, torch.cat(parts))
    assert run.data_ptr() == parts[0].data_ptr() and run.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert contiguous_run([buf.narrow(0, 4, 2), buf.narrow(0, 1, 3)]) is None  # out of order
    assert contiguous_run([buf.narrow(0, 0, 2), buf.narrow(0, 3, 2)]) is None  # a gap
    assert contiguous_run([buf.narrow(0, 0, 2), torch.zeros(2)]) is None  # another storage
    assert contiguous_run([buf[::2]]) is None  # strided
    assert contiguous_run([buf.view(2, 5)]) is None  # not 1-D
    assert contiguous_run([buf.narrow(0, 0, 2), buf.double().narrow(0, 2, 2)]) is None  # mixed dtypes
    assert contiguous_run([]) is None


ALL_FIXES = ["fp32-master-reuse", "gradient-view"]


@pytest.mark.slow
def test_the_installed_deepspeed_gets_all_fixes(inprocess_dist):
    # Fails when a DeepSpeed upgrade rewrites a patched method: then check ds_zero3_fixes against it.
    assert ds_zero3_fixes.applied_fixes() == ALL_FIXES
    assert ds_zero3_fixes.describe() == "ZeRO-3 optimizer fixes: " + ", ".join(ALL_FIXES)


@pytest.mark.parametrize("name,install,method", [
    ("fp32-master-reuse", "_install_master_reuse", "_create_fp32_partitions"),
    ("gradient-view", "_install_gradient_view", "_prepare_fp32_grad_for_sub_group")])
@pytest.mark.slow
def test_a_fix_refuses_to_install_on_other_source(inprocess_dist, monkeypatch, name, install, method):
    """A DeepSpeed whose method is not the source checked (stood in for by another recorded hash) keeps
    its own method, and the start-up line names the fix as not installed."""
    import dataclasses

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    from mgt_scale.parallel import ds_patches

    class Optimizer(Stage3):  # a subclass, so that installing here leaves DeepSpeed's class alone
        pass
    assert getattr(ds_zero3_fixes, install)(Optimizer) and method in vars(Optimizer)  # the source checked
    delattr(Optimizer, method)
    monkeypatch.setitem(ds_patches.PATCHES, name, dataclasses.replace(ds_patches.PATCHES[name], sha256="0" * 64))
    assert not getattr(ds_zero3_fixes, install)(Optimizer) and method not in vars(Optimizer)
    line = ds_zero3_fixes.describe()
    other = [n for n in ALL_FIXES if n != name][0]
    assert line.startswith(f"ZeRO-3 optimizer fixes: {other}; {name} NOT installed (DeepSpeed 0.19.8: "), line
    assert f"{method} not the source checked" in line, line


@pytest.mark.slow
def test_the_off_switch_installs_nothing(inprocess_dist, monkeypatch):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    class Optimizer(Stage3):
        pass
    monkeypatch.setenv("MGT_DS_ZERO3_FIXES", "0")
    assert not ds_zero3_fixes._install_master_reuse(Optimizer)
    assert not ds_zero3_fixes._install_gradient_view(Optimizer)
    assert not vars(Optimizer).keys() & {"_create_fp32_partitions", "_prepare_fp32_grad_for_sub_group"}
    assert ds_zero3_fixes.describe() == "ZeRO-3 optimizer fixes: off (MGT_DS_ZERO3_FIXES=0)"


def build(fixes: bool, precision: str = "fp32"):
    from mgt_scale.parallel.topology import plan_batch
    from mgt_scale.engine.zero import ZeroEngine
    ds_zero3_fixes.set_enabled(fixes)
    try:
        cfg = load_config(None, BASE + [f"parallel.precision={precision}"])
        e = ZeroEngine(cfg, plan_batch(cfg, 1), precision)
    finally:
        ds_zero3_fixes.set_enabled(True)
    e.set_lr(1e-2)
    return e


def batches(steps: int, skip: int = 0):
    g = torch.Generator().manual_seed(0)
    out = [[(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
            for _ in range(2)] for _ in range(skip + steps)]
    return out[skip:]


def train(e, steps: int, fixes: bool, skip: int = 0):
    ds_zero3_fixes.set_enabled(fixes)
    try:
        return [(r.loss, r.grad_norm) for r in (e.train_step(mb) for mb in batches(steps, skip))]
    finally:
        ds_zero3_fixes.set_enabled(True)


def weights(e) -> dict:
    from mgt_scale.parallel.convert import consolidated_state_dict
    return consolidated_state_dict(e)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def count_calls(engines: dict, attr: str) -> dict:
    """Count calls of optimizer method `attr` per engine (name -> engine), through an instance attribute."""
    calls = {name: 0 for name in engines}
    for name, e in engines.items():
        method = getattr(e.optimizer, attr)

        def counting(*args, name=name, method=method):
            calls[name] += 1
            return method(*args)
        setattr(e.optimizer, attr, counting)
    return calls


@pytest.mark.slow
def test_fixes_train_bit_identically_and_remove_the_copies(inprocess_dist):
    on, off = build(True), build(False)
    flattens = count_calls({"on": on, "off": off}, "flatten")
    r_on, r_off = train(on, 4, True), train(off, 4, False)
    assert r_on == r_off  # losses and gradient norms, bit for bit
    assert all(norm > 0.05 for _, norm in r_on)  # clipping was active on every step
    assert_same_weights(weights(on), weights(off))
    groups = len(off.optimizer.fp16_groups)  # the optimizer's parameter groups (decay / no decay)
    assert groups == 2 and flattens == {"on": 0, "off": 4 * groups}  # without the fix: a flatten per group per step
    # fix 1: the fp32 master is the model's own partition with the fix, a second copy without
    o_on, o_off = on.optimizer, off.optimizer
    for i in range(groups):
        assert o_on.fp32_partitioned_groups_flat[i].data_ptr() == o_on.fp16_partitioned_groups_flat[i].data_ptr()
        assert o_off.fp32_partitioned_groups_flat[i].data_ptr() != o_off.fp16_partitioned_groups_flat[i].data_ptr()
    assert isinstance(o_on.device, str)  # the wrapper put DeepSpeed's own value back


@pytest.mark.slow
def test_fixes_train_bit_identically_in_bf16(inprocess_dist):
    # bf16 model, fp32 master partitions (a tiny model: bf16 matmul is slow on this CPU)
    on, off = build(True, "bf16"), build(False, "bf16")
    r_on, r_off = train(on, 2, True), train(off, 2, False)
    assert r_on == r_off and all(l == l for l, _ in r_on)  # bit for bit, and finite (NaN != NaN)
    assert_same_weights(weights(on), weights(off))


@pytest.mark.slow
@pytest.mark.parametrize("save_fixes,load_fixes", [(False, True), (True, False)], ids=["off-to-on", "on-to-off"])
def test_checkpoints_resume_exactly_across_the_fixes(inprocess_dist, tmp_path, save_fixes, load_fixes):
    whole = build(load_fixes)
    r_whole = train(whole, 4, load_fixes)
    first = build(save_fixes)
    train(first, 2, save_fixes)
    first.save(str(tmp_path), "step_2", {})
    second = build(load_fixes)
    second.load(str(tmp_path), "step_2")
    assert train(second, 2, load_fixes, skip=2) == r_whole[2:]
    assert_same_weights(weights(second), weights(whole))


@pytest.mark.slow
def test_a_skipped_non_finite_step_leaves_weights_and_gradients_clean(inprocess_dist, fault_hooks):
    e, ref = build(True), build(True)
    train(e, 1, True)
    train(ref, 1, True)
    before = weights(e)
    with fault_hooks.nan_loss():  # the engine's lm_loss NaN (tests/fault_hooks)
        assert e.train_step(batches(1, skip=1)[0]).skipped
    assert_same_weights(weights(e), before)
    # the next finite step is the one a run without the NaN step takes (the reused gradient buffer holds
    # no NaN left over from the skipped step)
    assert train(e, 1, True, skip=2) == train(ref, 1, True, skip=2)
    assert_same_weights(weights(e), weights(ref))
