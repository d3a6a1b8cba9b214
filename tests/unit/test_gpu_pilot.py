# bench/gpu_pilot.sh --tiny on the CPU, the way the device runs it (the machine's python, the checkout on
# PYTHONPATH, no DeepSpeed and no `datasets` importable): it makes its data in `mgt prep`'s format, runs the
# init factorial and the four training cells, and leaves at most the 8 files the device tool returns, with
# the numbers in them. Also the sizing arithmetic and the factorial's budget stop.
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_pilot  # noqa: E402


def test_size_steps_fits_the_budget_and_caps():
    timing = {"build_s": 1.0, "step_s": 0.1, "probe_s": 0.5}
    n = gpu_pilot.size_steps(100.0, 4, timing, 50, 600)
    assert n == 176  # (25 - 1 - 2 * 0.5) / (0.1 * 1.2 + 0.5 / 50)
    cell = timing["build_s"] + n * timing["step_s"] * 1.2 + (n / 50 + 2) * timing["probe_s"]
    assert 4 * cell <= 100.0
    assert gpu_pilot.size_steps(1e6, 4, timing, 50, 600) == 600
    assert gpu_pilot.size_steps(1.0, 4, timing, 50, 600) == 0


@pytest.mark.slow
def test_tiny_pilot_runs_as_on_the_device(tmp_path):
    block = tmp_path / "block"  # what the device image lacks
    for mod in ("deepspeed", "datasets"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('{mod}: not on the device machine')\n")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(block),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", str(ROOT / "bench/gpu_pilot.sh"), "--tiny", "--work", str(work), "--budget-s", "900"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    kinds = ("preln", "postln", "deepnorm", "mgt")
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["init_factorial.csv", "pilot.log", "summary.md", "timings.json",
                            *(f"train_{k}.csv" for k in kinds)])  # the device tool returns 8 files at most
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)

    fact = list(csv.DictReader(open(out / "init_factorial.csv")))
    assert len(fact) == 24  # 4 kinds x 3 inits + (ddl, mgt) x 3 inits x 2 alphas, depth 4, seed 0
    assert all(0 < float(row["raw_last"]) <= 1 and 0 < float(row["rho_last"]) <= 1 for row in fact)

    for k in kinds:
        rows = list(csv.DictReader(open(out / f"train_{k}.csv")))
        steps = [int(x["step"]) for x in rows if x["loss"]]
        probes = [int(x["step"]) for x in rows if x["rho_last"]]
        assert steps == [1, 2, 3, 4, 5] and probes == [0, 2, 4, 5], (k, steps, probes)
        assert all(math.isfinite(float(x["loss"])) and float(x["loss"]) > 0 for x in rows if x["loss"])
        assert all(0 < float(x["rho_last"]) <= 1 and float(x["valid_loss"]) > 0 for x in rows if x["rho_last"])

    info = json.loads((out / "timings.json").read_text())
    assert info["steps_per_cell"] == 5 and info["timing"]["step_s"] > 0 and len(info["timing"]["step_times_s"]) == 20
    assert info["factorial"]["cells_done"] == info["factorial"]["cells_planned"] == 24
    assert [t["steps_done"] for t in info["train"]] == [5, 5, 5, 5]
    assert 3 < info["unigram"]["unigram_loss_eval_batches"] < math.log(512)
    summary = (out / "summary.md").read_text()
    assert all(f"| {k} | 5/5 |" in summary for k in kinds)

    # the data is a valid `mgt prep` output: every shard checks against the manifest (sha256)
    from mgt_scale.data.shards import check_output
    (data,) = [p for p in work.iterdir() if p.name.startswith("stdlib_")]
    assert check_output(data, full=True) == []


def test_factorial_stops_at_its_budget(tmp_path):
    """A budget of 0 s runs no cell (and the summary says so); the CSV keeps its header."""
    s = dict(gpu_pilot.SIZES["tiny"])
    calls = []
    orig = gpu_pilot.init_factorial.build
    gpu_pilot.init_factorial.build = lambda *a, **k: calls.append(a) or orig(*a, **k)
    try:
        import torch
        base = gpu_pilot.write_base(tmp_path / "base.yaml", tmp_path / "no_data_needed", s, 5)
        res = gpu_pilot.factorial(base, s, torch.device("cpu"), tmp_path / "f.csv", 0.0)
    finally:
        gpu_pilot.init_factorial.build = orig
    assert res["cells_done"] == 0 and not calls
    assert (tmp_path / "f.csv").read_text().startswith("residual,depth,seed")
