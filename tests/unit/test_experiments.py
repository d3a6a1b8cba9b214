# Sweep files: parsing, grid expansion and naming, strict errors; collection of fake run directories
# into results.csv / results.md; reproducibility of an init-only sweep run twice.
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from mgt_scale.config import ConfigError
from mgt_scale.experiments import collect as C
from mgt_scale.experiments import runner
from mgt_scale.experiments.sweep import cell_config, load_sweep

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:.*malformed line")

TINY_BASE = {
    "run": {"dir": "runs/x", "name": "x"},
    "model": {"num_layers": 2, "d_model": 32, "num_heads": 2, "d_ff": 64, "vocab_size": 32, "max_seq_len": 32},
    "data": {"synthetic": "copy", "seq_len": 16, "prefetch": 0},
    "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 4, "warmup_steps": 1},
    "monitor": {"interval": 2, "probe_batch_size": 2, "probe_seq_len": 16},
}


def write_sweep(tmp_path: Path, body: dict, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body, sort_keys=False))
    return p


def test_grid_product_and_names(tmp_path):
    p = write_sweep(tmp_path, {"base": TINY_BASE, "runs_dir": str(tmp_path / "runs"), "seeds": [0, 7],
                               "grid": {"model.residual": ["preln", "mgt"], "model.num_layers": [2, 3]}})
    sw = load_sweep(p)
    names = [c.name for c in sw.cells]
    assert len(names) == 2 * 2 * 2
    assert "residual-preln__num_layers-2__seed-0" in names
    assert "residual-mgt__num_layers-3__seed-7" in names
    c = next(c for c in sw.cells if c.name == "residual-mgt__num_layers-3__seed-7")
    cfg = cell_config(sw, c)
    assert cfg.model.residual == "mgt" and cfg.model.num_layers == 3 and cfg.train.seed == 7
    assert Path(cfg.run.dir) == tmp_path / "runs" / c.name
    assert (tmp_path / "runs" / "base.yaml").is_file()  # inline base written for `mgt train --config`


def test_cells_times_grid_and_shared_last_key(tmp_path):
    p = write_sweep(tmp_path, {
        "base": TINY_BASE, "runs_dir": "r", "set": {"model.residual": "mgt"},
        "cells": [{"name": "a", "set": {"model.mgt.alpha_init": 0.2}}, {"name": "b"}],
        "grid": {"model.mgt.eps": [0.0, 0.2], "data.seed": [1]}})
    sw = load_sweep(p, root=tmp_path)
    names = [c.name for c in sw.cells]
    assert names[0] == "a__eps-0__seed-1__seed-0"
    assert len(names) == 4
    cfg = cell_config(sw, sw.cells[1])
    assert cfg.model.mgt.alpha_init == 0.2 and cfg.model.mgt.eps == 0.2 and cfg.model.residual == "mgt"
    # two grid keys with the same last part get their full dotted names
    p2 = write_sweep(tmp_path, {"base": TINY_BASE, "runs_dir": "r",
                                "grid": {"data.seed": [1], "train.seed": [2]}}, "s2.yaml")
    assert load_sweep(p2, root=tmp_path).cells[0].name == "data_seed-1__train_seed-2__seed-0"


@pytest.mark.parametrize("body, needle", [
    ({"base": TINY_BASE, "runs_dir": "r", "grid": {"model.num_layers": [2]}, "bogus": 1}, "bogus: unknown key"),
    ({"base": TINY_BASE, "runs_dir": "r", "grid": {"model.nmu_layers": [2]}}, "model.nmu_layers"),
    ({"base": TINY_BASE, "runs_dir": "r", "cells": [{"name": "a", "sett": {}}]}, "cells[0].sett: unknown key"),
    ({"base": TINY_BASE, "runs_dir": "r", "grid": {"model.num_layers": 2}}, "non-empty list"),
    ({"base": TINY_BASE, "runs_dir": "r"}, "needs a grid, cells"),
    ({"runs_dir": "r", "grid": {"model.num_layers": [2]}}, "base: required"),
    ({"base": "nope.yaml", "runs_dir": "r", "grid": {"model.num_layers": [2]}}, "not found"),
    ({"base": TINY_BASE, "runs_dir": "r", "seeds": [], "grid": {"model.num_layers": [2]}}, "seeds"),
])
def test_errors_name_file_and_key(tmp_path, body, needle):
    p = write_sweep(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load_sweep(p, root=tmp_path)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_duplicate_key_in_a_sweep_file_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a sweep with a second `grid:` would run half its cells."""
    p = tmp_path / "sweep.yaml"
    p.write_text(f"base: {TINY_BASE}\nruns_dir: r\ngrid:\n  model.num_layers: [2]\ngrid:\n  train.lr: [1e-3]\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(p, root=tmp_path)
    assert str(p) in str(e.value) and "grid: duplicate key at lines 3 and 5" in str(e.value)


def test_invalid_cell_value_fails_before_running(tmp_path, capsys):
    p = write_sweep(tmp_path, {"base": TINY_BASE, "runs_dir": str(tmp_path / "r"),
                               "grid": {"model.num_heads": [3]}})
    assert runner.main([str(p)]) != 0
    err = capsys.readouterr().err
    assert "num_heads-3__seed-0" in err and "model.num_heads" in err


@pytest.mark.slow
def test_repo_sweep_configs_parse():
    files = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    sweeps = [f for f in files if not f.name.startswith("base_")]
    assert len(sweeps) >= 5
    for f in sweeps:
        sw = load_sweep(f, root=REPO)
        for c in sw.cells:
            cfg = cell_config(sw, c)
            if cfg.monitor.interval:
                assert cfg.train.max_steps % cfg.monitor.interval == 0, (f, c.name)


def _geo(step, ranks, ops=()):
    return {"step": step, "layers": [{"layer": i, "eff_rank_norm": r} for i, r in enumerate(ranks)], "ops": list(ops)}


def _fake_run(d: Path, residual: str, depth: int, valid: float, train_losses, init_ranks, final_ranks, ops=()):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"residual": residual, "num_layers": depth, "d_model": 32},
                                                   "train": {"max_steps": 10}}))
    (d / "status.json").write_text(json.dumps({"state": "finished", "step": 10, "valid_loss": valid}))
    with open(d / "metrics.jsonl", "w") as f:
        for i, l in enumerate(train_losses):
            f.write(json.dumps({"step": i + 1, "loss": l, "lr": 1e-3}) + "\n")
        f.write('{"step": 99, "lo')  # partial last line: skipped
    (d / C.INIT_FILE).write_text(json.dumps(_geo(0, init_ranks)))
    with open(d / "geometry.jsonl", "w") as f:
        f.write(json.dumps(_geo(5, [0.0] * len(final_ranks))) + "\n")
        f.write(json.dumps(_geo(10, final_ranks, ops)) + "\n")


def test_collect_fake_runs(tmp_path):
    runs = tmp_path / "runs"
    p = write_sweep(tmp_path, {"base": TINY_BASE, "runs_dir": str(runs),
                               "grid": {"model.residual": ["preln", "mhc_gate", "ddl", "mgt"]}})
    sw = load_sweep(p)
    losses = {"preln": 5.0, "mhc_gate": 4.9, "ddl": 4.8, "mgt": 4.6}
    ops = [{"beta_mean": 0.4, "beta_frac_negative": 0.1}, {"beta_mean": 0.2, "beta_frac_negative": 0.3}]
    for c in sw.cells:
        k = c.get("model.residual")
        _fake_run(runs / c.name, k, 2, losses[k], [6, 5, 4, 3, 2, 1, 1], [0.9, 0.8, 0.7], [0.6, 0.3, 0.5],
                  ops if k in ("mgt", "ddl") else ())
    (runs / sw.cells[3].name / C.EVAL_FILE).write_text(json.dumps({"copy_acc": 0.75}))
    rows = runner.collect(sw, figures=True)
    assert len(rows) == 4
    with open(runs / "results.csv") as f:
        table = list(csv.DictReader(f))
    by = {r["residual"]: r for r in table}
    assert float(by["mgt"]["valid_loss"]) == pytest.approx(4.6)
    assert float(by["mgt"]["perplexity"]) == pytest.approx(math.exp(4.6), rel=1e-5)
    assert float(by["mgt"]["final_train_loss"]) == pytest.approx((4 + 3 + 2 + 1 + 1) / 5)
    assert float(by["mgt"]["init_rank_last"]) == pytest.approx(0.7)
    assert float(by["mgt"]["init_rank_min"]) == pytest.approx(0.7)
    assert float(by["mgt"]["final_rank_last"]) == pytest.approx(0.5)
    assert float(by["mgt"]["final_rank_min"]) == pytest.approx(0.3)
    assert float(by["mgt"]["beta_mean"]) == pytest.approx(0.3)
    assert float(by["mgt"]["beta_frac_negative"]) == pytest.approx(0.2)
    assert float(by["mgt"]["copy_acc"]) == pytest.approx(0.75)
    assert by["preln"]["beta_mean"] == "" and by["preln"]["copy_acc"] == ""
    assert by["mgt"]["final_geometry_step"] == "10"
    md = (runs / "results.md").read_text()
    assert "synergy" in md
    syn = C.synergy(rows)[0]
    assert syn["synergy"] == pytest.approx(0.4 - (0.1 + 0.2))
    assert (runs / "figures" / "ablation.png").is_file()
    assert (runs / "figures" / "rank_by_layer.png").is_file()


def test_finished_cells_are_skipped(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    p = write_sweep(tmp_path, {"base": TINY_BASE, "runs_dir": str(runs), "grid": {"model.residual": ["preln"]}})
    sw = load_sweep(p)
    d = runs / sw.cells[0].name
    _fake_run(d, "preln", 2, 3.0, [3.0], [0.9, 0.9, 0.9], [0.5, 0.5, 0.5])
    (d / C.EVAL_FILE).write_text("{}")
    called = []
    monkeypatch.setattr(runner.subprocess, "call", lambda *a, **k: called.append(a) or 0)
    assert runner.main([str(p), "--no-figures"]) == 0
    assert not called
    assert (runs / "results.csv").is_file() and (runs / "commands.sh").is_file()
    assert "mgt slurm submit" in (runs / "commands.sh").read_text()


def test_init_only_sweep_is_reproducible(tmp_path):
    body = {"base": TINY_BASE, "runs_dir": str(tmp_path / "a"), "init_only": True,
            "grid": {"model.residual": ["preln", "mgt"], "model.num_layers": [2, 4]}}
    pa = write_sweep(tmp_path, body, "a.yaml")
    pb = write_sweep(tmp_path, dict(body, runs_dir=str(tmp_path / "b")), "b.yaml")
    assert runner.main([str(pa), "--no-figures"]) == 0
    assert runner.main([str(pb), "--no-figures"]) == 0
    ta = (tmp_path / "a" / "results.csv").read_text()
    tb = (tmp_path / "b" / "results.csv").read_text()
    assert ta == tb
    rows = list(csv.DictReader(ta.splitlines()))
    assert len(rows) == 4 and all(r["init_rank_last"] not in ("", "nan") for r in rows)
    assert all(r["status"] == "init_only" for r in rows)
    assert all(r["final_rank_last"] == "" for r in rows)
    # a rerun reuses the cached geometry and gives the same table
    assert runner.main([str(pa), "--no-figures"]) == 0
    assert (tmp_path / "a" / "results.csv").read_text() == ta


def test_a_cell_out_of_disk_space_stops_the_sweep(tmp_path, monkeypatch):
    """exit_codes.NO_SPACE: the later cells would fail the same way, so none starts, and the sweep
    exits with the same code (as the SLURM job script, it does not go on regardless)."""
    from mgt_scale import exit_codes
    runs = tmp_path / "runs"
    p = write_sweep(tmp_path, {"base": TINY_BASE, "runs_dir": str(runs), "grid": {"model.residual": ["preln", "mgt"]}})
    called = []
    monkeypatch.setattr(runner.subprocess, "call", lambda *a, **k: called.append(a) or exit_codes.NO_SPACE)
    assert runner.main([str(p), "--no-figures"]) == exit_codes.NO_SPACE
    assert len(called) == 1
