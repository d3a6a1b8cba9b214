# Unit tests of mgt_scale.monitor.loggers: JSONL append-after-reopen, resume truncation and crash
# tolerance, strict JSON output, fan-out, the W&B sink offline (and never raising when wandb fails),
# W&B mode resolution, TensorBoard, and build_loggers from a config.
import json
import warnings

import numpy as np
import pytest
import torch

from mgt_scale.monitor import loggers as L
from mgt_scale.monitor.metrics import make_geometry_record


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def geometry_record(step=10):
    layers = [{"layer": i, "eff_rank": 8.0 - i, "eff_rank_norm": (8.0 - i) / 8, "stable_rank": 2.0, "cosine": 0.1 * i,
               "rank1_residual": 0.5, "norm": 1.0 + i} for i in range(3)]
    ops = [{"sublayer": j, "block": j // 2, "kind": "attn" if j % 2 == 0 else "ffn", "beta_mean": 0.4 - 0.5 * j,
            "beta_std": 0.1, "beta_frac_negative": 0.5 * j, "beta_hist": [0] * 14 + [5, 5] + [0] * 14,
            "gate_mean": 0.5, "gate_saturation": 0.0, "alpha_mean": 0.0, "update_ratio": 0.2} for j in range(2)]
    return make_geometry_record(step, layers, ops)


def test_jsonl_appends_after_reopen(tmp_path):
    p = tmp_path / "run" / "metrics.jsonl"
    with L.JsonlLogger(p) as lg:
        lg.log({"loss": 3.0, "lr": 1e-3}, step=1)
        lg.log({"loss": 2.5, "lr": 1e-3}, step=2)
    with L.JsonlLogger(p) as lg:
        lg.log({"loss": 2.0, "lr": 1e-3}, step=3)
    assert [r["step"] for r in lines(p)] == [1, 2, 3]
    assert lines(p)[2] == {"step": 3, "loss": 2.0, "lr": 1e-3}


def test_jsonl_flushes_each_line(tmp_path):
    p = tmp_path / "m.jsonl"
    lg = L.JsonlLogger(p)
    lg.log({"loss": 1.0}, step=1)
    assert lines(p) == [{"step": 1, "loss": 1.0}]  # visible before close
    lg.close()


def test_jsonl_resume_drops_records_after_checkpoint_and_partial_line(tmp_path):
    p = tmp_path / "m.jsonl"
    with L.JsonlLogger(p) as lg:
        for s in range(1, 6):
            lg.log({"loss": float(s)}, step=s)
    with open(p, "a") as f:
        f.write('{"step": 6, "lo')  # the crash hit mid-line
    with L.JsonlLogger(p, resume_step=3) as lg:
        lg.log({"loss": 40.0}, step=4)
    assert [(r["step"], r["loss"]) for r in lines(p)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_jsonl_partial_line_without_resume_is_isolated(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with L.JsonlLogger(p) as lg:
        lg.log({"loss": 3.0}, step=3)
    with pytest.warns(RuntimeWarning, match="1 malformed"):
        recs = L.read_jsonl(p)
    assert [r["step"] for r in recs] == [1, 3]


def test_jsonl_is_strict_json_with_tensors_and_nan(tmp_path):
    p = tmp_path / "m.jsonl"
    with L.JsonlLogger(p) as lg:
        lg.log({"loss": float("nan"), "t": torch.tensor(2.5), "v": np.float32(1.5), "a": np.arange(2),
                "nested": {"x": float("inf")}, "step": 99}, step=7)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert lines(p) == [{"step": 7, "loss": None, "t": 2.5, "v": 1.5, "a": [0, 1], "nested": {"x": None}}]


def test_geometry_and_metrics_go_to_their_own_files(tmp_path):
    m, g = tmp_path / "metrics.jsonl", tmp_path / "geometry.jsonl"
    with L.MultiLogger([L.JsonlLogger(m), L.JsonlLogger(g, geometry=True)]) as lg:
        lg.log({"loss": 1.0}, step=10)
        lg.log_geometry(geometry_record(10), step=10)
    assert lines(m) == [{"step": 10, "loss": 1.0}]
    (rec,) = lines(g)
    assert rec["step"] == 10 and len(rec["layers"]) == 3 and rec["ops"][1]["kind"] == "ffn"
    assert len(rec["beta_hist_edges"]) == 31


def test_geometry_scalars_and_histograms():
    rec = geometry_record()
    sc = L.geometry_scalars(rec)
    assert sc["geometry/eff_rank_norm/layer_002"] == 6.0 / 8
    assert sc["geometry/min_eff_rank_norm"] == 6.0 / 8 and sc["geometry/min_eff_rank_norm_layer"] == 2
    assert sc["mgt/beta_frac_negative/sublayer_001"] == 0.5
    hists = L.beta_histograms(rec)
    counts, edges = hists["mgt/beta_hist/sublayer_000"]
    assert counts.sum() == 10 and len(edges) == 31


def test_resolve_wandb_mode(tmp_path):
    home = {"HOME": str(tmp_path)}  # no ~/.netrc there
    assert L.resolve_wandb_mode("auto", home) == "offline"
    assert L.resolve_wandb_mode("auto", {**home, "WANDB_API_KEY": "k"}) == "online"
    assert L.resolve_wandb_mode("online", {**home, "WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert L.resolve_wandb_mode("auto", {**home, "WANDB_MODE": "dryrun"}) == "offline"
    assert L.resolve_wandb_mode("offline", {**home, "WANDB_API_KEY": "k"}) == "offline"
    assert L.resolve_wandb_mode("auto", {**home, "WANDB_DISABLED": "true"}) == "disabled"
    with pytest.warns(RuntimeWarning, match="no API key"):
        assert L.resolve_wandb_mode("online", home) == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert L.resolve_wandb_mode("auto", home) == "online"


@pytest.mark.slow
def test_wandb_offline_logs_and_keeps_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    run_dir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # our sink must not have disabled itself
        lg = L.WandbLogger("mgt-test", run_dir, name="t", config={"a": 1})
        assert lg.enabled and lg.mode == "offline"
        lg.log({"loss": 1.0, "lr": 1e-3, "nested": {"x": 2}, "note": "text"}, step=1)
        lg.log_geometry(geometry_record(1), step=1)
        assert lg.enabled
        run_id = lg.run.id
        lg.close()
    assert (run_dir / L.WANDB_ID_FILE).read_text().strip() == run_id
    assert list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert not (run_dir / "wandb").exists()  # WANDB_DIR wins


def test_wandb_init_failure_warns_once_and_never_raises(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")

    def boom(*a, **k):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="no service") as rec:
        lg = L.WandbLogger("p", tmp_path)
        lg.log({"loss": 1.0}, step=1)
        lg.log_geometry(geometry_record(), step=1)
        lg.close()
    assert not lg.enabled and len(rec) == 1


def test_wandb_log_failure_disables(tmp_path, monkeypatch):
    import wandb

    class FakeRun:
        id = "abc"
        calls = 0

        def log(self, *a, **k):
            FakeRun.calls += 1
            raise OSError("disk full")

        def finish(self):
            pass

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(wandb, "init", lambda **k: FakeRun())
    lg = L.WandbLogger("p", tmp_path / "run")
    assert lg.enabled and lg.mode == "offline"
    with pytest.warns(RuntimeWarning, match="disk full") as rec:
        lg.log({"loss": 1.0}, step=1)
        lg.log({"loss": 1.0}, step=2)
    assert FakeRun.calls == 1 and len(rec) == 1 and not lg.enabled


def test_wandb_disabled_mode_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lg = L.WandbLogger("p", tmp_path)
    lg.log({"loss": 1.0}, step=1)
    assert not lg.enabled and lg.run is None


def test_tensorboard_logger_writes_events(tmp_path):
    with L.TensorBoardLogger(tmp_path / "tb") as lg:
        assert lg.enabled
        lg.log({"loss": 1.0}, step=1)
        lg.log_geometry(geometry_record(1), step=1)
        assert lg.enabled
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_build_loggers_from_config(tmp_path):
    from mgt_scale.config import load_config

    cfg = load_config(None, ["data.synthetic=copy", "log.tensorboard=true"])
    lg = L.build_loggers(cfg, tmp_path)
    assert [type(x).__name__ for x in lg.loggers] == ["JsonlLogger", "JsonlLogger", "TensorBoardLogger"]
    lg.log({"loss": 2.0}, step=1)
    lg.log_geometry(geometry_record(1), step=1)
    lg.close()
    assert lines(tmp_path / L.METRICS_FILE) == [{"step": 1, "loss": 2.0}]
    assert lines(tmp_path / L.GEOMETRY_FILE)[0]["step"] == 1
    assert len(L.build_loggers(cfg, tmp_path, rank=1)) == 0
