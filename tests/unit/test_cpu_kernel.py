# The fused CPU kernel of the MGT update (mgt_scale/model/cpu_kernel.py, csrc/mgt_update_cpu.cpp): it builds
# on this machine and is really used, matches the paper's formulas in fp64 for every form with every
# parameter perturbed and at the edges (saturated sigmoid and tanh, NaN), gives the same gradients
# whatever the thread count, and fails safe (a failed build falls back to torch ops with a warning; a
# lock file left by a build killed midway does not hang the next), and builds once: with the interpreter's
# own ninja whatever PATH names first, under $TORCH_EXTENSIONS_DIR when set, announced on stderr.
# test_model_residual.py's fused-path test holds it to the fp32 reference in a whole model.
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mgt_scale.config import MGTConfig, ModelConfig
from mgt_scale.model import ResidualOp, cpu_kernel

D = 16


def make_ops(kind="mgt", scale=0.3, **mgt):
    """(kernel op, reference op) with the same non-trivial parameters."""
    ops = []
    for kw in ({}, {"fused": False}):
        cfg = ModelConfig(residual=kind, d_model=D, num_heads=2, d_ff=32, mgt=MGTConfig(**mgt, **kw))
        op = ResidualOp(cfg)
        op.init_weights(cfg, torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in op.parameters():
                p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        ops.append(op)
    return ops


def sublayer(h):
    return torch.tanh(h @ torch.linspace(-1, 1, D * D, dtype=h.dtype).reshape(D, D)) + 0.1 * h


def grads_by_name(op):
    """Every parameter's gradient, the packed `vectors` split into its named parts (LN weight, b_beta,
    alpha, ...), so that each is checked against its own scale."""
    grads = {n: p.grad.clone() for n, p in op.named_parameters() if n != "vectors"}
    grads.update(zip(op.vector_names, op.vectors.grad.clone().split(op.vector_sizes)))
    return grads


def run(op, x, go):
    x = x.detach().clone().requires_grad_(True)
    out = op(x, sublayer)
    out.backward(go)
    return out.detach(), x.grad, grads_by_name(op), out


def assert_as_accurate_as_torch(kernel_op, ref_op, x, go, floor=2e-6):
    """Output, input gradient and every parameter gradient of the kernel against the paper's formulas
    in fp64: each error (relative to the tensor's largest entry) at most 4x that of the same formulas in
    torch fp32, or `floor`. (fp32 torch is no exact reference itself: 1 - tanh^2 near |tanh| = 1, say.)"""
    exact_op = copy.deepcopy(ref_op).double()
    exact = run(exact_op, x.double(), go.double())
    got, fp32 = run(kernel_op, x, go), run(ref_op, x, go)
    assert type(got[3].grad_fn).__name__ == "_FusedUpdateBackward"
    pairs = [("output", got[0], fp32[0], exact[0]), ("grad x", got[1], fp32[1], exact[1])]
    pairs += [(n, got[2][n], fp32[2][n], exact[2][n]) for n in exact[2]]
    for name, k, t, e in pairs:
        scale = e.abs().max().clamp_min(1e-12)
        k_err, t_err = ((k - e).abs().max() / scale).item(), ((t - e).abs().max() / scale).item()
        assert k_err <= max(4 * t_err, floor), (name, k_err, t_err)


def test_kernel_builds_here_and_is_the_path_taken():
    assert cpu_kernel.load() is not None, f"kernel unavailable: {cpu_kernel.unavailable_reason()}"
    kernel_op, ref_op = make_ops()
    x = torch.randn(2, 5, D)
    assert type(run(kernel_op, x, torch.ones(2, 5, D))[3].grad_fn).__name__ == "_FusedUpdateBackward"
    assert type(run(ref_op, x, torch.ones(2, 5, D))[3].grad_fn).__name__ != "_FusedUpdateBackward"


@pytest.mark.parametrize("kind,mgt", [
    ("mgt", {}), ("mgt", {"proj_rank": 4}), ("mgt", {"proj_rank": 4, "beta_shape": "token"}),
    ("mgt", {"alpha_shape": "channel", "lam": 0.7, "eps": 0.1}), ("mgt", {"beta_shape": "token", "alpha_shape": "channel"}),
    ("mhc_gate", {}), ("ddl", {}), ("ddl", {"proj_rank": 4, "beta_shape": "token"}),
])
def test_kernel_matches_reference_with_every_parameter_perturbed(kind, mgt):
    """Unlike the model-level test (gate and beta weights at their 1e-3 init), every parameter here is
    O(0.3), so the gate LN's backward and the alpha terms carry real weight."""
    kernel_op, ref_op = make_ops(kind, **mgt)
    x = torch.randn(3, 20, D, generator=torch.Generator().manual_seed(6))
    go = torch.randn(3, 20, D, generator=torch.Generator().manual_seed(7))
    assert_as_accurate_as_torch(kernel_op, ref_op, x, go)


@pytest.mark.parametrize("mgt", [{}, {"beta_shape": "token", "alpha_shape": "channel"}])
def test_saturated_gate_and_beta_match_fp64_reference(mgt):
    """Gate LN weight and beta projection scaled up so that sigmoid and tanh see |z| up to ~100, where
    the kernel's exp is clamped; the kernel is held to the paper's formulas in fp64 as tightly as torch's
    own fp32 ops are."""
    kernel_op, ref_op = make_ops(**mgt)
    with torch.no_grad():
        for op in (kernel_op, ref_op):
            op.gate_norm_weight.mul_(40.0)
            op.gate_beta[D:].mul_(300.0)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(2))
    go = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = torch.nn.functional.linear(x, ref_op.gate_beta[D:]) + ref_op.beta_bias
        g = torch.nn.functional.layer_norm(torch.nn.functional.linear(x, ref_op.gate_beta[:D]), (D,),
                                           ref_op.gate_norm_weight, ref_op.gate_norm_bias)
    assert z.abs().max() > 50 and g.abs().max() > 50  # really saturated
    assert_as_accurate_as_torch(kernel_op, ref_op, x, go)


def test_nan_propagates_like_the_reference():
    kernel_op, ref_op = make_ops()
    x = torch.randn(2, 4, D)
    x[1, 2, 5] = float("nan")
    with torch.no_grad():
        a, b = kernel_op(x, sublayer), ref_op(x, sublayer)
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.isnan(a).any()
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_gradients_do_not_depend_on_thread_count():
    """The kernel's reductions over rows (gate LN weight/bias, b_beta, alpha) go through fixed chunks of
    16 rows: bitwise equal gradients with 1 and 2 threads over 150 rows. (torch's own LayerNorm backward,
    for the main norm, is not thread-count invariant, so it is not checked.)"""
    kernel_op, _ = make_ops(alpha_shape="channel")
    x = torch.randn(3, 50, D, generator=torch.Generator().manual_seed(4))
    go = torch.randn(3, 50, D, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2):
            torch.set_num_threads(n)
            kernel_op.zero_grad(set_to_none=True)
            grads.append(run(kernel_op, x, go))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0][1], grads[1][1])
    for n in ("gate_norm_weight", "gate_norm_bias", "beta_bias", "alpha"):  # the kernel's reductions
        assert torch.equal(grads[0][2][n], grads[1][2][n]), n


def test_inputs_the_kernel_cannot_take_use_torch_ops():
    assert not cpu_kernel.usable(torch.zeros(2, 12))  # width not a multiple of 8
    assert not cpu_kernel.usable(torch.zeros(2, 16, dtype=torch.bfloat16))
    assert not cpu_kernel.usable(torch.zeros(2, 16, dtype=torch.float64))
    assert cpu_kernel.usable(torch.zeros(2, 16))


def test_failed_build_falls_back_to_torch_ops_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'mgt_update_cpu': c++: not found")

    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(RuntimeWarning, match="could not be built.*c\\+\\+: not found"):
        assert cpu_kernel.load() is None
    assert "c++: not found" in cpu_kernel.unavailable_reason()
    kernel_op, ref_op = make_ops()
    x, go = torch.randn(2, 5, D), torch.randn(2, 5, D)
    a, b = run(kernel_op, x, go), run(ref_op, x, go)
    assert type(a[3].grad_fn).__name__ != "_FusedUpdateBackward"
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_lock_left_by_a_killed_build_does_not_hang_the_next(tmp_path):
    cpu_kernel.load()
    lock = cpu_kernel.build_directory() / "lock"
    lock.write_text("")  # what torch leaves when a build is killed between taking and releasing its baton
    code = textwrap.dedent("""
        from mgt_scale.model import cpu_kernel
        assert cpu_kernel.load() is not None, cpu_kernel.unavailable_reason()
        print("loaded")
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    finally:
        lock.unlink(missing_ok=True)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-2000:]


def test_each_installation_builds_in_its_own_directory(monkeypatch, tmp_path):
    """Two checkouts or virtual environments must not share a build directory, where each would rebuild
    the other's kernel (their build commands name different paths)."""
    here = cpu_kernel.build_directory()
    assert here == cpu_kernel.build_directory()  # stable within an installation
    assert here.name == "mgt_update_cpu" and here.parent.name.startswith(
        f"py{sys.version_info.major}{sys.version_info.minor}_torch")
    monkeypatch.setattr(cpu_kernel, "_SOURCE", tmp_path / "other_checkout" / "mgt_update_cpu.cpp")
    other_checkout = cpu_kernel.build_directory()
    monkeypatch.undo()
    fake_torch = tmp_path / "other_venv" / "torch" / "__init__.py"
    monkeypatch.setattr(torch, "__file__", str(fake_torch))
    other_venv = cpu_kernel.build_directory()
    assert len({here, other_checkout, other_venv}) == 3
    assert len({p.parent.parent for p in (here, other_checkout, other_venv)}) == 1  # all under mgt_scale/


@pytest.mark.parametrize("args,expected", [
    (("preln", True, True, 16, "cpu", "fp32"), "mgt.cpu_kernel: not used (residual preln)"),
    (("mgt", False, True, 16, "cpu", "fp32"), "mgt.cpu_kernel: off (torch-op path)"),
    (("mgt", True, False, 16, "cpu", "fp32"), "mgt.cpu_kernel: off (torch-op path)"),
    (("ddl", True, True, 16, "cuda", "bf16"), "mgt.cpu_kernel: not used (cuda, bf16, d_model 16; torch-op path)"),
    (("mgt", True, True, 12, "cpu", "fp32"), "mgt.cpu_kernel: not used (cpu, fp32, d_model 12; torch-op path)"),
    (("mhc_gate", True, True, 16, "cpu", "fp32"), "mgt.cpu_kernel: in use"),
])
def test_start_up_line_names_the_path_taken(args, expected):
    assert cpu_kernel.describe(*args) == expected


def test_start_up_line_says_when_the_build_failed(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_state", {"error": "CalledProcessError: ninja failed"})
    assert cpu_kernel.describe("mgt", True, True, 16, "cpu", "fp32") == (
        "mgt.cpu_kernel: UNAVAILABLE, torch-op path (CalledProcessError: ninja failed)")


def fake_ninja_dir(tmp_path):
    """A directory whose `ninja` records that it ran and fails: put first on PATH, it stands for another
    installation's ninja (the system's, another venv's) that a rank's PATH happens to name first."""
    d = tmp_path / "foreign_bin"
    d.mkdir()
    script = d / "ninja"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'foreign_ninja_ran'}\nexit 1\n")
    script.chmod(0o755)
    return d


def test_extensions_dir_is_the_root_of_the_build_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    default = cpu_kernel.build_directory()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = cpu_kernel.build_directory()
    assert here.relative_to(tmp_path / "mgt_scale")  # under it, not under ~/.cache/torch_extensions
    assert here.parts[-2:] == default.parts[-2:]  # the per-installation directory below it, unchanged


def test_the_build_runs_the_interpreters_ninja_whatever_path_says(monkeypatch, tmp_path, capsys):
    """cpp_extension runs `ninja` by name: during the build, PATH's first ninja is the interpreter's,
    and the process's PATH is the same after. The build is announced on stderr before and after."""
    import shutil

    import torch.utils.cpp_extension as cpp_extension
    ours = cpu_kernel.interpreter_ninja()
    assert ours is not None and ours.parent == Path(sys.executable).parent
    path = f"{fake_ninja_dir(tmp_path)}:{os.environ['PATH']}"
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    seen = {}

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        seen["ninja"] = shutil.which("ninja")
        (Path(build_directory) / "mgt_update_cpu.so").write_text("built")
        return "module"
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert cpu_kernel.load() == "module"
    assert seen["ninja"] == str(ours)
    assert os.environ["PATH"] == path
    err = capsys.readouterr().err
    d = cpu_kernel.build_directory()
    assert f"compiling the MGT C++ kernel (first use, ~45 s) in {d}\n" in err
    assert "compiled the MGT C++ kernel in " in err


def test_a_cached_build_loads_without_a_rebuild_under_a_foreign_ninja(tmp_path):
    """The kernel built (by this test session), a process whose PATH names another ninja first loads the
    cached .so: that ninja never runs, nothing is recompiled, nothing is announced."""
    assert cpu_kernel.load() is not None, cpu_kernel.unavailable_reason()
    so = cpu_kernel.build_directory() / "mgt_update_cpu.so"
    built = so.stat().st_mtime_ns
    env = dict(os.environ, PATH=f"{fake_ninja_dir(tmp_path)}:{os.environ['PATH']}")
    code = "from mgt_scale.model import cpu_kernel\nassert cpu_kernel.load() is not None, cpu_kernel.unavailable_reason()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "foreign_ninja_ran").exists()
    assert so.stat().st_mtime_ns == built
    assert "compiling the MGT C++ kernel" not in r.stderr


@pytest.mark.slow
def test_a_fresh_build_in_the_extensions_dir_with_a_foreign_ninja_on_path(tmp_path):
    """End to end (one real compile, ~45 s): TORCH_EXTENSIONS_DIR set and a foreign ninja first on PATH;
    the first process builds there, with the interpreter's ninja, and says so; a second process with the
    same environment loads that build (the .so untouched) without a word."""
    env = dict(os.environ, PATH=f"{fake_ninja_dir(tmp_path)}:{os.environ['PATH']}",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    code = ("from mgt_scale.model import cpu_kernel\nassert cpu_kernel.load() is not None, cpu_kernel.unavailable_reason()\n"
            "print(cpu_kernel.build_directory())")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    d = Path(first.stdout.strip())
    so = d / "mgt_update_cpu.so"
    assert d.relative_to(tmp_path / "ext") and so.is_file()
    assert f"compiling the MGT C++ kernel (first use, ~45 s) in {d}" in first.stderr
    built = so.stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert so.stat().st_mtime_ns == built and "compiling the MGT C++ kernel" not in second.stderr
    assert not (tmp_path / "foreign_ninja_ran").exists()
