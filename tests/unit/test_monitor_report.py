# Unit tests of `mgt report` (mgt_scale.monitor.report): a synthetic run directory gives the PNG files
# and a report.md with the expected numbers; missing inputs give a clear error and exit code 2.
import json

import pytest
import torch

from mgt_scale.monitor import report, report_plots
from mgt_scale.monitor.loggers import GEOMETRY_FILE, METRICS_FILE, JsonlLogger
from mgt_scale.monitor.metrics import layer_geometry, make_geometry_record, summarise_mgt_ops

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, with_geometry=True, with_ops=True):
    with JsonlLogger(run_dir / METRICS_FILE) as m:
        for s in range(0, 101, 10):
            m.log({"loss": 5.0 - 0.03 * s, "lr": 1e-3}, step=s)
            if s % 50 == 0:
                m.log({"valid_loss": 5.2 - 0.03 * s}, step=s)
        m.log({"loss": 1.875, "lr": 1e-3}, step=100)  # a resumed run re-logged step 100: the later value wins
    if not with_geometry:
        return
    gen = torch.Generator().manual_seed(0)
    with JsonlLogger(run_dir / GEOMETRY_FILE, geometry=True) as g:
        for step in (0, 50, 100):
            # 5 layers; layer 3 collapses to rank 1 by the last probe
            hs = [torch.randn(2, 16, 32, generator=gen, dtype=torch.float64) for _ in range(5)]
            if step == 100:
                hs[3] = torch.ones(2, 16, 32, dtype=torch.float64)
            ops = []
            if with_ops:
                ops = summarise_mgt_ops([
                    {"block": j // 2, "kind": "attn" if j % 2 == 0 else "ffn",
                     "beta": torch.full((2, 16, 32), 0.45 - 0.25 * j * step / 100, dtype=torch.float64),
                     "gate": torch.full((2, 16, 32), 0.5), "alpha": 0.1 * j,
                     "update": 1.0, "residual": 4.0} for j in range(8)])
            g.log_geometry(make_geometry_record(step, layer_geometry(hs), ops), step)


@pytest.mark.slow
def test_report_writes_plots_and_numbers(tmp_path, capsys):
    write_run(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    out = tmp_path / "report"
    for f in report.PLOT_FILES.values():
        data = (out / f).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, f
    md = (out / "report.md").read_text()
    assert "- final train loss: 1.8750 (step 100)" in md
    assert "- final valid loss: 2.2000 (step 100)" in md
    assert "- best valid loss: 2.2000 (step 100)" in md
    assert "3 probe(s), steps 0 to 100, 5 layers" in md
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| first") or line.startswith("| last")}
    geo = [json.loads(x) for x in (tmp_path / GEOMETRY_FILE).read_text().splitlines()]
    first = geo[0]["layers"]
    k = min(range(5), key=lambda i: first[i]["eff_rank_norm"])
    assert rows["first"][:5] == ["0", f"{first[k]['eff_rank_norm']:.4f}", str(k), f"{first[4]['eff_rank']:.2f}",
                                 f"{first[4]['eff_rank_norm']:.4f}"]
    assert rows["last"][:4] == ["100", "0.0625", "3", f"{geo[2]['layers'][4]['eff_rank']:.2f}"]  # 1/16 at layer 3
    assert rows["last"][5:] == ["1.0000", "3"]  # all-equal tokens: cosine 1
    # operator table at the last probe: beta_mean per sublayer j is 0.45 - 0.25 j
    ops_rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                for line in md.splitlines() if line.startswith("| beta_") or line.startswith("| update_ratio")}
    assert ops_rows["beta_mean"] == ["-0.4250", "-1.3000", "0.4500", "7"]
    assert ops_rows["beta_frac_negative"][:3] == ["0.7500", "0.0000", "1.0000"]
    assert ops_rows["update_ratio"][:3] == ["0.2500", "0.2500", "0.2500"]
    assert "- sublayers with negative mean beta (erasing on average): 6 of 8" in md
    assert "![effective rank by layer](eff_rank_heatmap.png)" in md
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_report_without_geometry_or_ops(tmp_path):
    write_run(tmp_path, with_geometry=False)
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r"), "--dpi", "50"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["loss.png", "report.md"]
    assert "No geometry probes" in (tmp_path / "r" / "report.md").read_text()

    run2 = tmp_path / "run2"
    run2.mkdir()
    write_run(run2, with_ops=False)
    assert report.main([str(run2)]) == 0
    names = sorted(p.name for p in (run2 / "report").iterdir())
    assert names == ["cosine_by_depth.png", "eff_rank_heatmap.png", "loss.png", "report.md"]
    assert "No operator statistics" in (run2 / "report" / "report.md").read_text()


@pytest.mark.slow
def test_single_probe_run(tmp_path):
    with JsonlLogger(tmp_path / METRICS_FILE) as m:
        m.log({"loss": 3.0, "lr": 1e-3}, step=5)
    with JsonlLogger(tmp_path / GEOMETRY_FILE, geometry=True) as g:
        g.log_geometry(make_geometry_record(5, layer_geometry([torch.randn(1, 4, 8)] * 2)), 5)
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| first | 5 |" in md and "| last |" not in md and "valid loss: none logged" in md


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl not found" in err and "run directory" in err
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "lr": 0.1}\n')
    assert report.main([str(tmp_path)]) == 2
    assert "no records with a step and a loss" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0
    assert "mgt report" in capsys.readouterr().out


ALARMS = {"alarm_eff_rank_norm_below": 0.1, "alarm_cosine_above": 0.95, "alarm_after_step": 20}


def write_config(run_dir, **monitor):
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump({"run": {"dir": str(run_dir)}, "monitor": monitor}))


def _by_label(fig):
    return {a.get_label(): a for a in fig.axes if a.get_label()}


def _probe_lines(ax):
    return [ln for ln in ax.lines if (ln.get_gid() or "").startswith("probe_step_")]


@pytest.mark.slow
def test_plots_show_every_probe_and_the_alarm_thresholds(tmp_path):
    """The figures draw the data: one line per probe, the config's thresholds, beta in beta units."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    write_run(tmp_path)
    write_config(tmp_path, **ALARMS, alarm_policy="warn")
    _, geometry = report.load_run(tmp_path)
    mon = report.load_alarm_config(tmp_path)
    assert (mon.alarm_eff_rank_norm_below, mon.alarm_cosine_above, mon.alarm_after_step) == (0.1, 0.95, 20)

    fig = report.plot_eff_rank_heatmap(geometry, tmp_path / "e.png", 50, mon)
    ax = _by_label(fig)
    thr = [ln for ln in ax["eff_rank_min"].lines if ln.get_gid() == report_plots.ALARM_GID]
    assert len(thr) == 1 and set(np.asarray(thr[0].get_ydata(), dtype=float)) == {0.1}
    contours = [c for c in ax["eff_rank_heatmap"].collections if c.get_gid() == report_plots.ALARM_GID]
    assert len(contours) == 1 and list(contours[0].levels) == [0.1]
    mins = [ln for ln in ax["eff_rank_min"].lines if ln.get_label() == "min over layers"][0]
    assert list(mins.get_xdata()) == [0, 50, 100] and mins.get_ydata()[-1] == pytest.approx(1 / 16)

    fig = report.plot_cosine_by_depth(geometry, tmp_path / "c.png", 50, mon)
    ax = _by_label(fig)
    for name in ("cosine", "norm"):
        lines = _probe_lines(ax[name])
        assert [ln.get_gid() for ln in lines] == ["probe_step_0", "probe_step_50", "probe_step_100"]
        assert len({tuple(ln.get_color()) for ln in lines}) == 3  # coloured by step
    assert list(_probe_lines(ax["cosine"])[1].get_ydata()) == pytest.approx([l["cosine"] for l in geometry[1]["layers"]])
    thr = [ln for ln in ax["cosine"].lines if ln.get_gid() == report_plots.ALARM_GID]
    assert len(thr) == 1 and set(np.asarray(thr[0].get_ydata(), dtype=float)) == {0.95}

    fig = report.plot_beta_by_depth(geometry, tmp_path / "b.png", 50)
    ax = _by_label(fig)
    assert len(_probe_lines(ax["beta_mean"])) == len(_probe_lines(ax["beta_frac_negative"])) == 3
    last = _probe_lines(ax["beta_mean"])[-1].get_ydata()
    assert list(last) == pytest.approx([0.45 - 0.25 * j for j in range(8)])
    mesh = ax["beta_heatmap"].collections[0]
    data = np.asarray(mesh.get_array())
    assert data.shape == (8, 3) and data.min() == pytest.approx(-1.3) and data.max() == pytest.approx(0.45)
    norm = mesh.norm  # beta crosses 0: diverging, centred at 0, the colourbar spans the real range
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0.0
    assert norm.vmin == pytest.approx(-1.3) and norm.vmax == pytest.approx(0.45)
    assert mesh.colorbar is not None and "beta" in mesh.colorbar.ax.get_ylabel()


@pytest.mark.slow
def test_report_md_and_pngs_with_alarms(tmp_path):
    write_run(tmp_path)
    write_config(tmp_path, **ALARMS, alarm_policy="rollback")
    assert report.main([str(tmp_path), "--dpi", "50"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    # step 0 is before alarm_after_step; step 100 has the collapsed layer 3 (rank 1/16, cosine 1)
    assert ("- collapse alarms (config.yaml): eff_rank_norm < 0.1 or cosine > 0.95 at any layer, from step 20, "
            "policy rollback; tripped at 1 of 3 probe(s), first at step 100, last at step 100") in md
    assert "- final valid loss: 2.2000 (step 100)" in md  # valid_loss records still summarised


@pytest.mark.slow
def test_alarms_off_or_unknown_draw_no_threshold(tmp_path):
    write_run(tmp_path)
    _, geometry = report.load_run(tmp_path)
    assert report.load_alarm_config(tmp_path) is None
    fig = report.plot_cosine_by_depth(geometry, tmp_path / "c.png", 40, None)
    assert not [ln for ln in fig.axes[0].lines if ln.get_gid() == report_plots.ALARM_GID]
    assert report.main([str(tmp_path), "--dpi", "40"]) == 0
    assert "thresholds unknown" in (tmp_path / "report" / "report.md").read_text()
    write_config(tmp_path, alarm_eff_rank_norm_below=0.0)
    mon = report.load_alarm_config(tmp_path)
    fig = report.plot_eff_rank_heatmap(geometry, tmp_path / "e.png", 40, mon)
    assert not [a for ax in fig.axes for a in ax.lines + list(ax.collections) if a.get_gid() == report_plots.ALARM_GID]


def test_bad_alarm_value_in_config_is_a_clear_error(tmp_path, capsys):
    write_run(tmp_path)
    write_config(tmp_path, alarm_cosine_above="high")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: monitor.alarm_cosine_above = 'high' is not a number" in err and err.count("\n") == 1
