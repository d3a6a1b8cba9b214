# Strict configuration: unknown keys, duplicate keys, wrong types, out-of-range values (every numeric field
# declares its range), bad overrides and missing files are errors that name the file (or the --set) and the
# dotted key; a warm-up longer than the run is clamped.
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from mgt_scale.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def err(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\nmodel:\n  num_layer: 4\n")
    msg = err(p)
    assert str(p) in msg and "model.num_layer" in msg and "unknown key" in msg


def test_unknown_nested_key(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\nmodel:\n  mgt: {lamda: 1}\n")
    assert "model.mgt.lamda" in err(p)


def test_wrong_type(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\ntrain:\n  max_steps: ten\n")
    msg = err(p)
    assert "train.max_steps" in msg and "integer" in msg and str(p) in msg


def test_bool_is_not_an_int(tmp_path):
    assert "train.max_steps" in err(write(tmp_path, "data: {synthetic: copy}\ntrain: {max_steps: true}\n"))


def test_bad_literal(tmp_path):
    msg = err(write(tmp_path, "data: {synthetic: copy}\nmodel: {residual: resnet}\n"))
    assert "model.residual" in msg and "mgt" in msg


def test_missing_required_data(tmp_path):
    msg = err(write(tmp_path, "model: {num_layers: 2}\n"))
    assert "data.path" in msg and str(tmp_path) in msg


def test_impossible_values(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\nmodel: {d_model: 30, num_heads: 4}\n")
    assert "model.num_heads" in err(p)
    p = write(tmp_path, "data: {synthetic: copy}\nparallel: {mode: pipeline, zero_stage: 3, pipeline_stages: 2}\n")
    assert "parallel.zero_stage" in err(p) and "pipeline" in err(p)


def test_missing_file(tmp_path):
    msg = err(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_overrides(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\n")
    cfg = load_config(p, ["train.lr=3e-4", "model.mgt.eps=0.1", "model.residual=preln"])
    assert cfg.train.lr == 3e-4 and cfg.model.mgt.eps == 0.1 and cfg.model.residual == "preln"
    assert "train.lrr" in err(p, ["train.lrr=1"])
    assert "--set" in err(p, ["train.lrr=1"])
    assert "expected dotted.key=value" in err(p, ["train.lr"])
    assert "train.max_steps" in err(p, ["train.max_steps=abc"])
    assert "is not a section" in err(p, ["train.lr.x=1"])


def test_resolved_config_round_trips(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\nmodel: {num_layers: 3}\n")
    cfg = load_config(p, ["train.spike_zscore=4.5", "train.max_steps=12"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_retired_fault_injection_key_still_loads(tmp_path, capsys):
    """The config.yaml of a run (and of each checkpoint) written before the fault-injection hook left the
    config held `train.fault_inject_nan_steps: []`: it loads (resume, `mgt export`), the key dropped
    silently; a config that asks for NaN steps is told that the key is ignored."""
    p = write(tmp_path, "data: {synthetic: copy}\ntrain: {fault_inject_nan_steps: [], max_steps: 7}\n")
    cfg = load_config(p)
    assert cfg.train.max_steps == 7 and not hasattr(cfg.train, "fault_inject_nan_steps")
    assert "fault_inject_nan_steps" not in capsys.readouterr().err
    p.write_text("data: {synthetic: copy}\ntrain: {fault_inject_nan_steps: [3]}\n")
    load_config(p)
    assert "train.fault_inject_nan_steps is ignored" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Declared ranges (issue #28): every numeric field has one, NaN/inf and out-of-range values are refused

def numeric_fields(cls=None, prefix=""):
    """(dotted key, dataclass field, element type, in a tuple) of every int/float field reachable from Config."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, in_tuple = hints[f.name], False
        if typing.get_origin(tp) is tuple:
            tp, in_tuple = typing.get_args(tp)[0], True
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{prefix}{f.name}{'[0]' if in_tuple else ''}.")
            continue
        numeric = [a for a in (typing.get_args(tp) or (tp,)) if a in (int, float)]  # `float | None` counts too
        if numeric:
            yield f"{prefix}{f.name}", f, numeric[0], in_tuple


NUMERIC = list(numeric_fields())


def override_for(key, value, in_tuple):
    """A --set that puts `value` (YAML text) into the field `key` (data.blend[0].weight goes in a blend entry)."""
    if key.startswith("data.blend[0]."):
        return f"data.blend=[{{path: x, {key.rsplit('.', 1)[1]}: {value}}}]"
    return f"{key}=[{value}]" if in_tuple else f"{key}={value}"


def test_every_numeric_field_declares_a_range():
    from mgt_scale.config import Range, check_ranges
    keys = [k for k, *_ in NUMERIC]
    assert len(keys) > 50 and "train.lr" in keys and "data.blend[0].weight" in keys and "model.mgt.lam" in keys
    missing = [k for k, f, *_ in NUMERIC if not isinstance(f.metadata.get("range"), Range)]
    assert not missing, f"numeric config fields without a declared range (use config.num(default, ge=...)): {missing}"
    check_ranges(Config())  # every default lies in its range


@pytest.mark.parametrize("key,f,tp,in_tuple", NUMERIC, ids=[k for k, *_ in NUMERIC])
def test_nan_and_inf_are_refused(tmp_path, key, f, tp, in_tuple):
    p = write(tmp_path, "data: {synthetic: copy}\n")
    for value in ("nan", ".nan", "inf", "-.inf", "1e999"):
        text = override_for(key, value, in_tuple)
        msg = err(p, [text])
        assert f"--set {text}: " in msg and key.replace("[0]", "") in msg.replace("[0]", ""), msg
        assert str(p) not in msg
        if tp is float:
            assert "finite" in msg, msg


@pytest.mark.parametrize("text,rng", [
    ("train.lr=0", "> 0"), ("train.lr=-1e-3", "> 0"), ("train.beta1=1.5", "in [0, 1)"), ("train.beta2=1", "in [0, 1)"),
    ("train.beta1=-0.1", "in [0, 1)"), ("train.weight_decay=-0.5", ">= 0"), ("train.grad_clip=-1", ">= 0"),
    ("train.min_lr_ratio=1.5", "in [0, 1]"), ("train.spike_zscore=-1", ">= 0"), ("train.peak_flops=-1", ">= 0"),
    ("train.max_consecutive_nonfinite=0", ">= 1"), ("train.seed=-1", "in [0, "), ("data.seed=-1", "in [0, "),
    ("model.norm_eps=0", "> 0"), ("model.rope_base=1", "> 1"),
    ("model.vocab_size=1", ">= 2"), ("model.mgt.beta_init_std=-1e-3", ">= 0"), ("model.mgt.lam=-1", ">= 0"),
    ("parallel.zero_stage=4", "in [0, 3]"), ("data.prefetch=-1", ">= 0"), ("data.blend=[{path: x, weight: 0}]", "> 0"),
])
def test_out_of_range_values_name_override_key_and_range(tmp_path, text, rng):
    msg = err(write(tmp_path, "data: {synthetic: copy}\n"), [text])
    key = text.split("=", 1)[0]
    assert msg.startswith(f"--set {text}: {key}") and f" {rng}" in msg, msg


def test_range_error_in_the_file_names_the_file(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\ntrain:\n  beta1: 1.5\n")
    msg = err(p, ["train.lr=1e-3"])
    assert msg.startswith(f"{p}: train.beta1: ") and "[0, 1)" in msg and "1.5" in msg


def test_range_boundaries_are_accepted(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\n")
    cfg = load_config(p, ["train.grad_clip=0", "train.beta1=0", "train.weight_decay=0", "train.spike_zscore=0",
                          "train.min_lr_ratio=1", "model.mgt.eps=-0.5", "model.mgt.alpha_init=-1",
                          "parallel.zero_stage=1"])
    assert cfg.train.grad_clip == 0 and cfg.train.beta1 == 0 and cfg.model.mgt.eps == -0.5


# ----------------------------------------------------------------------------------------------
# YAML: duplicate keys, syntax errors, and errors in --set overrides name the override

def test_duplicate_key_names_key_file_and_both_lines(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\ntrain:\n  lr: 1.0e-3\n  max_steps: 10\n  lr: 2.0e-3\n")
    msg = err(p)
    assert msg.startswith(f"{p}: train.lr: duplicate key") and "lines 3 and 5" in msg
    msg = err(write(tmp_path, "train: {lr: 1.0e-3}\ndata: {synthetic: copy}\ntrain: {max_steps: 10}\n"))
    assert "train: duplicate key" in msg and "lines 1 and 3" in msg
    msg = err(write(tmp_path, "data: {synthetic: copy}\n"), ["train={lr: 1.0e-3, lr: 2.0e-3}"])
    assert msg.startswith("--set train={lr: 1.0e-3, lr: 2.0e-3}: train.lr: duplicate key")


def test_merge_keys_are_not_duplicates(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\ntrain:\n  <<: {lr: 1.0e-3, max_steps: 10}\n  lr: 2.0e-3\n"
                     "  warmup_steps: 1\n")
    cfg = load_config(p)
    assert cfg.train.lr == 2e-3 and cfg.train.max_steps == 10


def test_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\ntrain:\n  lr: [1, 2\n  max_steps: 3\n")
    msg = err(p)
    assert msg.startswith(f"{p}: line ") and "column" in msg and "invalid YAML" in msg and "\n" not in msg, msg
    msg = err(write(tmp_path, "data: {synthetic: copy}\n"), ["train.lr=[1,"])
    assert msg.startswith("--set train.lr=[1,: line 1, column") and "\n" not in msg, msg


def test_override_errors_name_the_override_not_the_file(tmp_path):
    p = write(tmp_path, "data: {synthetic: copy}\n")
    msg = err(p, ["train.max_steps=abc"])
    assert msg.startswith("--set train.max_steps=abc: train.max_steps: ") and str(p) not in msg
    # a check across fields names the override that set one of them
    msg = err(p, ["model.d_model=30"])
    assert msg.startswith("--set model.d_model=30: model.num_heads: ")
    # a whole section set by --set
    assert err(p, ["train={lr: .nan}"]).startswith("--set train={lr: .nan}: train.lr: ")


# ----------------------------------------------------------------------------------------------
# warm-up longer than the run: clamped at load, with a warning, and saved clamped

def test_warmup_is_clamped_to_max_steps(tmp_path, capsys):
    demo = REPO / "configs" / "demo.yaml"
    cfg = load_config(demo, ["train.max_steps=20"])
    assert cfg.train.warmup_steps == 20 and cfg.train.max_steps == 20
    assert capsys.readouterr().err.strip() == \
        "warning: train.warmup_steps=30 > train.max_steps=20: warm-up clamped to 20"
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and capsys.readouterr().err == ""
    from mgt_scale.train.schedule import lr_at
    assert lr_at(cfg.train, 19) == pytest.approx(cfg.train.lr)  # the last step ends the warm-up at the peak


def test_shipped_run_configs_are_valid():
    configs = REPO / "configs"
    files = [*configs.glob("*.yaml"), *(configs / "experiments").glob("base_*.yaml")]
    assert len(files) >= 4
    for f in files:
        load_config(f)


@pytest.mark.slow
def test_train_refuses_nan_lr_before_creating_the_run(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mgt_scale.cli", "train", "--config",
                        str(REPO / "configs/tiny_synthetic.yaml"), "--set", f"run.dir={run_dir}",
                        "--set", "train.lr=nan"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--set train.lr=nan: train.lr: " in r.stderr and "> 0" in r.stderr
    assert not run_dir.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_retired_probe_seed_still_loads(tmp_path):
    """`monitor.probe_seed` did nothing (the probe is the first validation batch) and was removed; the
    config.yaml of every earlier run holds it, and must still load for `--resume`."""
    old = tmp_path / "config.yaml"
    save_config(dataclasses.replace(Config(), data=dataclasses.replace(Config().data, synthetic="random")), old)
    assert "\nmonitor:\n" in old.read_text()
    old.write_text(old.read_text().replace("\nmonitor:\n", "\nmonitor:\n  probe_seed: 4321\n", 1))
    cfg = load_config(old)
    assert not hasattr(cfg.monitor, "probe_seed") and cfg.monitor.probe_batch_size == Config().monitor.probe_batch_size


@pytest.mark.parametrize("rank, value, warned", [(0, 4321, False), (3, 4321, False), (0, 99, True), (3, 99, False)])
def test_retired_key_warns_on_rank_0_only_and_not_at_its_old_default(tmp_path, monkeypatch, capsys, rank, value, warned):
    """Every saved config.yaml of earlier versions holds probe_seed: 4321 (the old default), and every rank
    loads it at every restart: before, one warning per rank per requeue (512 lines on 512 ranks)."""
    from mgt_scale.logs import setup_logging
    old = tmp_path / "config.yaml"
    save_config(dataclasses.replace(Config(), data=dataclasses.replace(Config().data, synthetic="random")), old)
    old.write_text(old.read_text().replace("\nmonitor:\n", f"\nmonitor:\n  probe_seed: {value}\n", 1))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("MGT_LOG_ALL_RANKS", raising=False)
    monkeypatch.delenv("MGT_LOG_LEVEL", raising=False)
    setup_logging()
    try:
        capsys.readouterr()
        load_config(old)
        assert ("monitor.probe_seed is ignored" in capsys.readouterr().err) == warned
    finally:
        setup_logging(rank=0, world=1, level="INFO", all_ranks=False)
