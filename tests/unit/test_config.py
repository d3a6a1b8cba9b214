# Strict configuration: unknown keys, wrong types, impossible values, bad overrides and missing files
# are errors that name the file (or override) and the dotted key.
import pytest

from mgt_scale.config import ConfigError, load_config, save_config


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
    cfg = load_config(p, ["train.fault_inject_nan_steps=[3, 4]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
