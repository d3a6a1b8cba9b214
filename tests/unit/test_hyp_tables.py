# scripts/hyp_tables.py: the compact per-cell CSV of a trained sweep and the RESULTS tables built from it
# (best lr per kind and depth; mean +- sd over seeds), on fake run folders with hand-computed values.
import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "hyp_tables.py"


def _load():
    spec = importlib.util.spec_from_file_location("hyp_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(runs: Path, name: str, kind: str, lr: float, seed: int, valid: float | None, state="finished",
          data: dict | None = None):
    d = runs / name
    d.mkdir(parents=True)
    cfg = {"model": {"residual": kind, "num_layers": 12}, "train": {"lr": lr, "seed": seed, "max_steps": 500},
           "monitor": {"probe_batch_size": 32, "probe_seq_len": 128}, "data": data or {}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "status.json").write_text(json.dumps({"state": state}))
    lines = [{"step": s, "loss": 10.0 - s} for s in range(1, 8)]  # last 5 losses: 7..3, mean 5.0
    lines.append({"step": 8, "valid_loss": 9.9})  # an earlier evaluation: not the final one
    if valid is not None:
        lines.append({"step": 9, "loss": 1.0, "valid_loss": valid})  # the last record has both
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def _geo(cell: str, raw: float, centred: float | None, rho: float) -> dict:
    side = {"raw": {"last": raw, "min": raw - 0.1}, "centred": {"last": centred, "min": centred},
            "rho_last": rho, "rho_min": rho, "cosine_last": 0.5}
    return {"cell": cell, "init": {"raw": {"last": 0.8}}, "trained": side}


def test_csv_then_lr_and_main_tables(tmp_path, capsys):
    ht = _load()
    runs = tmp_path / "runs"
    _cell(runs, "a-lr1", "preln", 1e-3, 0, 5.0)
    _cell(runs, "a-lr3", "preln", 3e-3, 0, 4.5)
    _cell(runs, "a-lr3-s1", "preln", 3e-3, 1, 4.7)
    _cell(runs, "b-lr1", "mgt", 1e-3, 0, 4.9)
    _cell(runs, "b-running", "mgt", 3e-3, 0, None, state="running")  # unfinished: left out
    (runs / "centred_rank.json").write_text(json.dumps([
        _geo("a-lr3", 0.40, 0.50, 0.2), _geo("a-lr3-s1", 0.60, 0.70, 0.3), _geo("b-lr1", 0.30, None, 1e-5)]))
    out = tmp_path / "cells.csv"
    assert ht.main(["csv", str(runs), str(out)]) == 0
    rows = {r["cell"]: r for r in ht.read(out)}
    assert sorted(rows) == ["a-lr1", "a-lr3", "a-lr3-s1", "b-lr1"]
    assert float(rows["a-lr3"]["valid_loss"]) == 4.5 and float(rows["a-lr3"]["train_loss"]) == 3.8  # (6+5+4+3+1)/5
    assert rows["b-lr1"]["centred_last"] == "nan" and float(rows["b-lr1"]["raw_last"]) == 0.3  # undefined
    assert rows["a-lr1"]["raw_last"] == ""  # no geometry for that cell
    capsys.readouterr()

    assert ht.main(["lr", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| preln | 12 | 5.000 | **4.600** | 0.003 |" in table  # lr 3e-3: the mean of seeds 0 and 1
    assert "| mgt | 12 | **4.900** | - | 0.001 |" in table

    sub = tmp_path / "main.csv"
    sub.write_text(out.read_text())
    assert ht.main(["main", str(sub)]) == 0
    table = capsys.readouterr().out
    # preln's three cells: valid 5.0, 4.5, 4.7 -> mean 4.733, sd 0.2517; raw 0.40, 0.60 -> 0.500 +- 0.141
    assert "| preln | 12 | 0.001, 0.003 | 3 | 4.733 +- 0.252 |" in table
    assert "| 0.500 +- 0.141 | 0.600 +- 0.141 | 0.2-0.3 |" in table
    assert "| mgt | 12 | 0.001 | 1 | 4.900 +- n/a |" in table and "| undefined |" in table
    rows["b-lr1"].update(raw_last="", centred_last="", rho_last="", raw_min="")  # not measured: "-"
    with sub.open("w", newline="") as f:
        import csv
        w = csv.DictWriter(f, fieldnames=ht.FIELDS)
        w.writeheader()
        w.writerows(rows.values())
    assert ht.main(["main", str(sub)]) == 0
    assert "| mgt | 12 | 0.001 | 1 | 4.900 +- n/a | 3.800 +- n/a | - | - | - | - |" in capsys.readouterr().out


def test_bad_usage_is_a_config_error(capsys):
    assert _load().main(["table", "x.csv"]) == 2
    assert "usage: hyp_tables.py" in capsys.readouterr().err


def test_copy_cells_add_accuracy_loss_and_the_step_the_task_was_learned(tmp_path, capsys):
    ht = _load()
    runs = tmp_path / "runs"
    copy = {"synthetic": "copy"}
    _cell(runs, "c-s0", "mgt", 3e-3, 0, 0.01, data=copy)  # train losses 9..3 then 1.0: never below 0.1
    _cell(runs, "c-s1", "mgt", 3e-3, 1, 0.02, data=copy)
    (runs / "c-s0" / "eval.json").write_text(json.dumps({"copy_acc": 0.5, "copy_loss": 0.25}))
    (runs / "c-s1" / "eval.json").write_text(json.dumps({"copy_acc": 1.0, "copy_loss": 0.05}))
    with (runs / "c-s1" / "metrics.jsonl").open("a") as f:  # crosses 0.1 at step 12, not again at 13
        f.write(json.dumps({"step": 12, "loss": 0.09}) + "\n" + json.dumps({"step": 13, "loss": 0.01}) + "\n")
    out = tmp_path / "copy.csv"
    assert ht.main(["csv", str(runs), str(out)]) == 0
    rows = {r["cell"]: r for r in ht.read(out)}
    assert rows["c-s0"]["solved_step"] == "" and rows["c-s1"]["solved_step"] == "12"
    assert float(rows["c-s1"]["copy_loss"]) == 0.05
    capsys.readouterr()
    assert ht.main(["copy", str(out)]) == 0
    # accuracy 0.5, 1.0 -> 0.750 +- 0.354; loss 0.25, 0.05 -> 0.15 +- 0.14
    assert "| mgt | 12 | 0.003 | 2 | 0.750 +- 0.354 | 0.15 +- 0.14 | never / 12 | - |" in capsys.readouterr().out

    lm = tmp_path / "lm"
    _cell(lm, "a", "preln", 1e-3, 0, 5.0)
    assert ht.main(["csv", str(lm), str(tmp_path / "lm.csv")]) == 0
    assert "copy_acc" not in (tmp_path / "lm.csv").read_text()  # LM sweeps keep their columns


def test_variants_table_groups_seeds_by_cell_name_across_sweeps(tmp_path, capsys):
    ht = _load()
    abl, main = tmp_path / "abl", tmp_path / "main"
    _cell(abl, "wide-L12__seed-0", "preln", 3e-3, 0, 4.0)
    _cell(abl, "wide-L12__seed-1", "preln", 3e-3, 1, 4.4)
    _cell(main, "preln-L12__seed-0", "preln", 3e-3, 0, 5.0)  # same kind, another variant: its own row
    _cell(main, "mgt-L12__seed-0", "mgt", 3e-3, 0, 3.0)
    (abl / "centred_rank.json").write_text(json.dumps([_geo("wide-L12__seed-0", 0.40, 0.50, 0.2),
                                                       _geo("wide-L12__seed-1", 0.60, 0.70, 0.3)]))
    for runs in (abl, main):
        assert ht.main(["csv", str(runs), str(tmp_path / f"{runs.name}.csv")]) == 0
    capsys.readouterr()
    assert ht.main(["variants", str(tmp_path / "abl.csv"), str(tmp_path / "main.csv"), "--match=wide*",
                    "--match=preln-*"]) == 0
    table = capsys.readouterr().out
    # wide: valid 4.0, 4.4 -> 4.200 +- 0.283; raw 0.4, 0.6 -> 0.500 +- 0.141
    assert "| abl | wide-L12 | preln | 12 | 0.003 | 2 | 4.200 +- 0.283 | 3.800 +- 0.000 | 0.500 +- 0.141 |" in table
    assert "| main | preln-L12 | preln | 12 | 0.003 | 1 | 5.000 +- n/a |" in table
    assert "mgt-L12" not in table  # no --match takes it
    assert table.index("wide-L12") < table.index("preln-L12")  # rows in the order of the globs
    assert ht.main(["variants", "--match=x"]) == 2  # no CSV: usage
    capsys.readouterr()
    assert ht.main(["variants", str(tmp_path / "abl.csv"), str(tmp_path / "typo.csv")]) == 2
    assert "no such CSV: " + str(tmp_path / "typo.csv") in capsys.readouterr().err
