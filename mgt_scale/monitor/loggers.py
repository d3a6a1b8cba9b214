# Metric sinks of a run: JSONL files (the source of truth that `mgt report` reads), Weights & Biases
# (offline unless a key is configured; never allowed to fail the run), TensorBoard (optional), and a
# MultiLogger that fans out. Also defines and documents the two JSONL file formats of a run dir.
"""Metric sinks and the run-directory log formats.

Every sink has ``log(record: dict, step: int)`` for scalar metrics and
``log_geometry(record: dict, step: int)`` for geometry probes; only rank 0 should hold sinks
(:func:`build_loggers` returns an empty MultiLogger elsewhere).

``RUN_DIR/metrics.jsonl`` -- one JSON object per ``log`` call::

    {"step": 120, "loss": 3.91, "lr": 0.0029, ...}      # any scalars the trainer logs
    {"step": 120, "valid_loss": 4.02}                   # several lines may share a step

``mgt report`` needs ``step``, ``loss`` and ``lr``; ``valid_loss`` is optional. Readers merge
the lines of one step in file order (a later value of a key wins), which also makes a resumed
run that re-logs steps after its checkpoint come out right.

``RUN_DIR/geometry.jsonl`` -- one JSON object per probe (built by
``mgt_scale.monitor.metrics.make_geometry_record``)::

    {"step": 500,
     "layers": [{"layer": 0, "eff_rank": 52.1, "eff_rank_norm": 0.81, "stable_rank": 9.3,
                 "cosine": 0.02, "rank1_residual": 0.93, "norm": 1.01}, ...],   # num_blocks + 1
     "ops": [{"sublayer": 0, "block": 0, "kind": "attn",            # identification as captured
              "beta_mean": 0.45, "beta_std": 0.03, "beta_frac_negative": 0.0,
              "beta_hist": [0, ..., 0],                             # 30 counts over beta_hist_edges
              "gate_mean": 0.5, "gate_saturation": 0.0, "alpha_mean": 0.0,
              "update_ratio": 0.21}, ...],                          # [] for non-MGT residuals
             # mhc adds h_res_row_dev, h_res_col_dev, h_res_diag_mean, h_res_min, h_pre_mean, h_post_mean;
             # ddl_delta adds beta_quantiles [min, p10, p50, p90, max], delta_value_mean, delta_proj_mean
     "beta_hist_edges": [-1.5, -1.4, ..., 1.5]}                    # present only when ops is not []

``layers[i]`` is the input of block i, the last entry the output of the last block. A
statistic whose input was not captured is ``null``. Non-finite floats (NaN/Inf) are written as
``null`` so that every line is strict JSON; readers treat ``null`` as NaN.

Lines are flushed one by one (a crash loses at most the line being written; a partial last line
is skipped by :func:`read_jsonl`). Re-opening a file appends; with ``resume_step`` the records
logged after that step by the interrupted run are dropped first.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

METRICS_FILE = "metrics.jsonl"
GEOMETRY_FILE = "geometry.jsonl"
WANDB_ID_FILE = "wandb_run_id"
DEFAULT_LAYER_KEYS = ("eff_rank_norm", "cosine", "rank1_residual", "norm")
DEFAULT_OP_KEYS = ("beta_mean", "beta_frac_negative", "gate_saturation", "alpha_mean", "update_ratio",
                   "h_res_row_dev", "h_res_col_dev", "h_res_diag_mean")


# ----------------------------------------------------------------------------------------------
# JSON helpers


def json_safe(obj: Any) -> Any:
    """Plain JSON types: tensors/numpy to Python numbers or lists, tuples to lists, NaN/Inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor, without importing torch
        obj = obj.detach().cpu().tolist()
        return json_safe(obj)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, skipping blank, partial or malformed lines (with a warning)."""
    out, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict):
                out.append(obj)
            else:
                bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", RuntimeWarning, stacklevel=2)
    return out


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric scalars of a (nested) record as {"a/b": value}; lists and strings are left out."""
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[key] = float(v)
        elif hasattr(v, "numel") and v.numel() == 1:
            out[key] = float(v.item())
    return out


def geometry_scalars(record: Mapping[str, Any], layer_keys: Sequence[str] = DEFAULT_LAYER_KEYS,
                     op_keys: Sequence[str] = DEFAULT_OP_KEYS) -> dict[str, float]:
    """Per-layer/per-sublayer series of a geometry record: ``geometry/<key>/layer_{i:03d}``,
    ``mgt/<key>/sublayer_{j:03d}``, plus ``geometry/min_eff_rank_norm`` and friends."""
    from mgt_scale.monitor.metrics import geometry_summary

    out: dict[str, float] = {}
    layers = record.get("layers") or []
    for i, layer in enumerate(layers):
        idx = int(layer.get("layer", i))
        for k in layer_keys:
            if layer.get(k) is not None:
                out[f"geometry/{k}/layer_{idx:03d}"] = float(layer[k])
    for k, v in geometry_summary(layers).items():
        if isinstance(v, float) and math.isnan(v):
            continue
        out[f"geometry/{k}"] = float(v)
    for j, op in enumerate(record.get("ops") or []):
        idx = int(op.get("sublayer", j))
        for k in op_keys:
            if op.get(k) is not None:
                out[f"mgt/{k}/sublayer_{idx:03d}"] = float(op[k])
    return out


def beta_histograms(record: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"mgt/beta_hist/sublayer_{j:03d}": (counts, edges)} of a geometry record."""
    from mgt_scale.monitor.metrics import BETA_HIST_EDGES

    edges = np.asarray(record.get("beta_hist_edges") or BETA_HIST_EDGES, dtype=np.float64)
    out = {}
    for j, op in enumerate(record.get("ops") or []):
        if op.get("beta_hist"):
            out[f"mgt/beta_hist/sublayer_{int(op.get('sublayer', j)):03d}"] = (
                np.asarray(op["beta_hist"], dtype=np.float64), edges)
    return out


# ----------------------------------------------------------------------------------------------
# Sinks


class MetricLogger:
    """Base sink: scalar records via ``log``, geometry records via ``log_geometry``."""

    def log(self, record: Mapping[str, Any], step: int) -> None:  # pragma: no cover - interface
        pass

    def log_geometry(self, record: Mapping[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlLogger(MetricLogger):
    """Appends one JSON object per call to ``path`` (flushed per line).

    ``geometry=False``: writes ``log`` records (metrics.jsonl); ``geometry=True``: writes
    ``log_geometry`` records (geometry.jsonl) and ignores ``log``. ``resume_step``: drop the
    records with ``step > resume_step`` left by the interrupted run before appending.
    """

    def __init__(self, path: str | Path, *, geometry: bool = False, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.geometry = geometry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._f = open(self.path, "a", encoding="utf-8")
        if self._f.tell() > 0 and not self._ends_with_newline():
            self._f.write("\n")  # isolate a partial line left by a crash
            self._f.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _truncate_after(self, step: int) -> None:
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # partial line of the crash
                if isinstance(obj, dict) and isinstance(obj.get("step"), (int, float)) and obj["step"] > step:
                    continue
                keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        tmp.replace(self.path)

    def _write(self, record: Mapping[str, Any], step: int) -> None:
        obj = {"step": int(step), **{k: v for k, v in record.items() if k != "step"}}
        self._f.write(json.dumps(json_safe(obj), allow_nan=False) + "\n")
        self._f.flush()

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if not self.geometry:
            self._write(record, step)

    def log_geometry(self, record: Mapping[str, Any], step: int) -> None:
        if self.geometry:
            self._write(record, step)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _netrc_has_wandb_key(environ: Mapping[str, str]) -> bool:
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = environ.get("NETRC") or os.path.join(environ.get("HOME", os.path.expanduser("~")), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str = "auto", environ: Mapping[str, str] | None = None) -> str:
    """"online" | "offline" | "disabled". WANDB_MODE in the environment wins over ``mode``;
    "auto" is online only when an API key is configured (WANDB_API_KEY or ~/.netrc); "online"
    without a key falls back to offline (an interactive login prompt would hang a batch job)."""
    env = os.environ if environ is None else environ
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    env_mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled"
    if mode in ("offline", "disabled"):
        return mode
    has_key = bool(env.get("WANDB_API_KEY")) or _netrc_has_wandb_key(env)
    if mode == "online" and not has_key:
        warnings.warn("wandb: no API key configured (WANDB_API_KEY or `wandb login`): logging offline; "
                      "upload later with `wandb sync`", RuntimeWarning, stacklevel=2)
    return "online" if has_key else "offline"


class WandbLogger(MetricLogger):
    """Weights & Biases sink that can never fail the run: any wandb error is caught, reported once
    as a RuntimeWarning, and the sink disables itself.

    The run id is kept in ``RUN_DIR/wandb_run_id`` so that a resumed job continues the same W&B run
    (online: ``resume="allow"``; offline segments share the id and are uploaded with `wandb sync`).
    Files go to ``$WANDB_DIR`` if set, else ``RUN_DIR`` (wandb adds a ``wandb/`` folder).
    """

    def __init__(self, project: str, run_dir: str | Path, *, name: str | None = None,
                 config: Mapping[str, Any] | None = None, mode: str = "auto", entity: str | None = None,
                 group: str | None = None, layer_keys: Sequence[str] = DEFAULT_LAYER_KEYS,
                 op_keys: Sequence[str] = DEFAULT_OP_KEYS) -> None:
        self.layer_keys, self.op_keys = tuple(layer_keys), tuple(op_keys)
        self.run: Any = None
        self.enabled = False
        self._warned = False
        self._wandb: Any = None
        self.mode = resolve_wandb_mode(mode)
        if self.mode == "disabled":
            return
        try:
            import wandb

            self._wandb = wandb
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file = run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.exists() else ""
            run_id = run_id or secrets.token_hex(4)
            self.run = wandb.init(
                project=project, entity=entity or None, group=group or None, name=name,
                config=dict(config) if config else None, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                mode=self.mode, id=run_id, resume="allow" if self.mode == "online" else None,
                settings=wandb.Settings(console="off", silent=True),
            )
            id_file.write_text(run_id + "\n")
            self.enabled = True
        except Exception as e:  # noqa: BLE001 - logging must never kill training
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.enabled = False
        if not self._warned:
            self._warned = True
            warnings.warn(f"wandb logging disabled after an error: {type(e).__name__}: {e}", RuntimeWarning,
                          stacklevel=3)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            data = _flatten(record)
            data.pop("step", None)
            if data:
                self.run.log(data, step=int(step))
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def log_geometry(self, record: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            data: dict[str, Any] = dict(geometry_scalars(record, self.layer_keys, self.op_keys))
            for key, (counts, edges) in beta_histograms(record).items():
                data[key] = self._wandb.Histogram(np_histogram=(counts, edges))
            if data:
                self.run.log(data, step=int(step))
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
            self.run = None
        self.enabled = False


class TensorBoardLogger(MetricLogger):
    """TensorBoard sink (torch.utils.tensorboard); disables itself with one warning on any error."""

    def __init__(self, log_dir: str | Path, *, layer_keys: Sequence[str] = DEFAULT_LAYER_KEYS,
                 op_keys: Sequence[str] = DEFAULT_OP_KEYS) -> None:
        self.layer_keys, self.op_keys = tuple(layer_keys), tuple(op_keys)
        self.writer: Any = None
        self.enabled = False
        self._warned = False
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
            self.enabled = True
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.enabled = False
        if not self._warned:
            self._warned = True
            warnings.warn(f"tensorboard logging disabled after an error: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=3)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            for k, v in _flatten(record).items():
                if k != "step":
                    self.writer.add_scalar(k, v, int(step))
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def log_geometry(self, record: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            for k, v in geometry_scalars(record, self.layer_keys, self.op_keys).items():
                self.writer.add_scalar(k, v, int(step))
            for k, (counts, edges) in beta_histograms(record).items():
                n = counts.sum()
                if n <= 0:
                    continue
                centers = 0.5 * (edges[1:] + edges[:-1])
                nz = np.nonzero(counts)[0]
                self.writer.add_histogram_raw(
                    k, min=float(edges[nz[0]]), max=float(edges[nz[-1] + 1]), num=int(n),
                    sum=float((counts * centers).sum()), sum_squares=float((counts * centers**2).sum()),
                    bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=int(step))
            self.writer.flush()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
            self.writer = None
        self.enabled = False


class MultiLogger(MetricLogger):
    """Fans every call out to its sinks, in order."""

    def __init__(self, loggers: Iterable[MetricLogger] = ()) -> None:
        self.loggers = list(loggers)

    def __len__(self) -> int:
        return len(self.loggers)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log(record, step)

    def log_geometry(self, record: Mapping[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log_geometry(record, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def build_loggers(cfg: Any, run_dir: str | Path, *, rank: int = 0, resume_step: int | None = None) -> MultiLogger:
    """The sinks a run's config asks for: metrics.jsonl and geometry.jsonl always, W&B if
    ``log.wandb``, TensorBoard (RUN_DIR/tensorboard) if ``log.tensorboard``. Non-zero ranks get
    an empty MultiLogger. ``resume_step``: the step of the checkpoint being resumed."""
    if rank != 0:
        return MultiLogger()
    from mgt_scale.config import to_dict

    run_dir = Path(run_dir)
    sinks: list[MetricLogger] = [
        JsonlLogger(run_dir / METRICS_FILE, resume_step=resume_step),
        JsonlLogger(run_dir / GEOMETRY_FILE, geometry=True, resume_step=resume_step),
    ]
    if cfg.log.wandb:
        sinks.append(WandbLogger(cfg.log.wandb_project, run_dir, name=cfg.run.name, config=to_dict(cfg),
                                 mode=cfg.log.wandb_mode, entity=cfg.log.wandb_entity or None,
                                 group=cfg.log.wandb_group or None))
    if cfg.log.tensorboard:
        sinks.append(TensorBoardLogger(run_dir / "tensorboard"))
    return MultiLogger(sinks)
