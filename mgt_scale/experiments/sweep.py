# Sweep files: strict YAML parsing (unknown keys are errors naming the file and key), expansion of a
# grid (cartesian product) and/or explicit cells times seeds into named cells, each one a normal run
# config = base + the sweep's common overrides + the cell's overrides + run.dir / train.seed.
"""Sweep YAML format (``mgt experiment SWEEP.yaml``)::

    name: ablation                 # optional; default: the file's stem
    base: configs/experiments/base_lm.yaml   # a run config path (relative to the repo / cwd,
                                   # then to the sweep file), or an inline run-config mapping
    runs_dir: runs/ablation        # every cell trains in <runs_dir>/<cell name>
    seeds: [0]                     # train.seed of every cell (default [0])
    init_only: false               # true: only measure geometry at initialisation (no training)
    set: {train.max_steps: 60}     # overrides applied to every cell (optional)
    grid:                          # dotted key -> list of values; cartesian product (optional)
      model.num_layers: [12, 48]
    cells:                         # explicit cells (optional); with a grid, each cell x each grid point
      - name: mgt
        set: {model.residual: mgt}

Cell names: ``<cell name>`` then one ``<key>-<value>`` per grid key (the key's last dotted part,
or the full key with dots as ``_`` where two keys share a last part), then ``seed-<seed>``,
joined by ``__`` — e.g. ``mgt__num_layers-48__seed-0``.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import mgt_scale.config.strict_yaml as strict_yaml
from mgt_scale.config import ConfigError, apply_override, load_config

SWEEP_KEYS = {"name", "base", "runs_dir", "seeds", "init_only", "set", "grid", "cells", "description"}
CELL_KEYS = {"name", "set"}
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Cell:
    name: str
    seed: int
    overrides: tuple[tuple[str, Any], ...]  # (dotted key, value), in application order

    def set_args(self) -> list[str]:
        """`--set k=v` strings for `mgt train` (values as YAML flow scalars)."""
        return [f"{k}={format_value(v)}" for k, v in self.overrides]

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in reversed(self.overrides):
            if k == key:
                return v
        return default


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    base_path: Path | None  # None when base is inline
    base_inline: dict | None
    runs_dir: Path
    seeds: tuple[int, ...]
    init_only: bool
    common: tuple[tuple[str, Any], ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    cells_spec: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    description: str = ""
    cells: tuple[Cell, ...] = field(default=())


def format_value(v: Any) -> str:
    """A value as `--set` parses it back (YAML): floats keep full precision, bools lower case."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def _name_value(v: Any) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, float):
        s = f"{v:g}"
    else:
        s = str(v)
    return _SAFE.sub("_", s)


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (l if last.count(l) == 1 else k.replace(".", "_")) for k, l in zip(keys, last)}


def _err(path: Path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {msg}")


def _check_key(path: Path, key: Any, where: str) -> str:
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise _err(path, where, f"bad dotted key {key!r}")
    try:  # validate against the run-config schema now, so a typo fails before any training
        apply_override({}, key, None, f"{path}")
    except ConfigError as e:
        raise ConfigError(f"{path}: {where}: {e}") from None
    return key


def _pairs(path: Path, mapping: Any, where: str) -> tuple[tuple[str, Any], ...]:
    if mapping is None:
        return ()
    if not isinstance(mapping, dict):
        raise _err(path, where, f"expected a mapping of dotted keys to values, got {type(mapping).__name__}")
    return tuple((_check_key(path, k, f"{where}.{k}"), v) for k, v in mapping.items())


def load_sweep(path: str | Path, root: str | Path | None = None) -> Sweep:
    """Parse and expand a sweep file strictly. `root`: where relative paths (base, runs_dir) are
    resolved first (default: the current directory); a base not found there is looked up next to
    the sweep file."""
    path = Path(path)
    root = Path(root) if root is not None else Path.cwd()
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        data = strict_yaml.load(path.read_text())
    except strict_yaml.StrictYAMLError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for k in data:
        if k not in SWEEP_KEYS:
            raise _err(path, str(k), f"unknown key (known keys: {', '.join(sorted(SWEEP_KEYS))})")
    for k in ("base", "runs_dir"):
        if k not in data:
            raise _err(path, k, "required")
    base = data["base"]
    base_path, base_inline = None, None
    if isinstance(base, str):
        cand = [root / base, path.parent / base] if not Path(base).is_absolute() else [Path(base)]
        found = next((c for c in cand if c.is_file()), None)
        if found is None:
            raise _err(path, "base", f"run config {base!r} not found (looked in {', '.join(map(str, cand))})")
        base_path = found
    elif isinstance(base, dict):
        base_inline = base
    else:
        raise _err(path, "base", "expected a run config path or an inline mapping")
    runs_dir = Path(data["runs_dir"])
    if not isinstance(data["runs_dir"], str):
        raise _err(path, "runs_dir", "expected a path")
    if not runs_dir.is_absolute():
        runs_dir = root / runs_dir
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _err(path, "seeds", f"expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _err(path, "seeds", "duplicate seeds")
    init_only = data.get("init_only", False)
    if not isinstance(init_only, bool):
        raise _err(path, "init_only", f"expected true/false, got {init_only!r}")
    common = _pairs(path, data.get("set"), "set")
    grid_raw = data.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise _err(path, "grid", "expected a mapping of dotted keys to lists of values")
    grid = []
    for k, vals in grid_raw.items():
        _check_key(path, k, f"grid.{k}")
        if not isinstance(vals, list) or not vals:
            raise _err(path, f"grid.{k}", f"expected a non-empty list of values, got {vals!r}")
        grid.append((k, tuple(vals)))
    cells_raw = data.get("cells") or []
    if not isinstance(cells_raw, list):
        raise _err(path, "cells", "expected a list of {name, set} mappings")
    cells_spec = []
    for i, c in enumerate(cells_raw):
        if not isinstance(c, dict):
            raise _err(path, f"cells[{i}]", "expected a mapping with name and set")
        for k in c:
            if k not in CELL_KEYS:
                raise _err(path, f"cells[{i}].{k}", f"unknown key (known keys: {', '.join(sorted(CELL_KEYS))})")
        name = c.get("name")
        if not isinstance(name, str) or not name or _SAFE.search(name):
            raise _err(path, f"cells[{i}].name", f"required, letters/digits/._+- only, got {name!r}")
        cells_spec.append((name, _pairs(path, c.get("set"), f"cells[{i}].set")))
    names = [n for n, _ in cells_spec]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise _err(path, "cells", f"duplicate cell names {sorted(dup)}")
    if not grid and not cells_spec:
        raise _err(path, "grid", "a sweep needs a grid, cells, or both")
    sweep = Sweep(path=path, name=str(data.get("name") or path.stem), base_path=base_path, base_inline=base_inline,
                  runs_dir=runs_dir, seeds=tuple(seeds), init_only=init_only, common=common, grid=tuple(grid),
                  cells_spec=tuple(cells_spec), description=str(data.get("description", "")))
    return _with_cells(sweep)


def _with_cells(sweep: Sweep) -> Sweep:
    keys = [k for k, _ in sweep.grid]
    short = _short_keys(keys)
    points = list(itertools.product(*[vals for _, vals in sweep.grid])) if keys else [()]
    specs = list(sweep.cells_spec) or [("", ())]
    cells = []
    for cname, csets in specs:
        for point in points:
            for seed in sweep.seeds:
                parts = ([cname] if cname else []) + [f"{short[k]}-{_name_value(v)}" for k, v in zip(keys, point)]
                parts.append(f"seed-{seed}")
                name = "__".join(parts)
                ov = list(sweep.common) + list(csets) + list(zip(keys, point))
                ov += [("train.seed", seed), ("run.dir", str(sweep.runs_dir / name)), ("run.name", name)]
                cells.append(Cell(name=name, seed=seed, overrides=tuple(ov)))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise _err(sweep.path, "grid", "two cells got the same name (values that differ only in characters "
                                       "outside [A-Za-z0-9._+-])")
    return Sweep(**{**sweep.__dict__, "cells": tuple(cells)})


def base_config_file(sweep: Sweep) -> Path:
    """The run config every cell's `mgt train --config` uses (an inline base is written to
    <runs_dir>/base.yaml)."""
    if sweep.base_path is not None:
        return sweep.base_path
    out = sweep.runs_dir / "base.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(sweep.base_inline, sort_keys=False)
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    return out


def cell_config(sweep: Sweep, cell: Cell):
    """The resolved, validated run Config of a cell (raises ConfigError naming the cell)."""
    base = base_config_file(sweep)
    try:
        return load_config(base, cell.set_args())
    except ConfigError as e:
        raise ConfigError(f"{sweep.path}: cell {cell.name}: {e}") from None
