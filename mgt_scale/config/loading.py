# Loading the run configuration strictly: YAML (mgt_scale.config.strict_yaml: no duplicate keys, errors
# with line and column), conversion to the typed schema (unknown keys, wrong types, NaN/inf and values
# outside a field's declared range are errors naming the file or the `--set` override and the dotted
# key), dotted overrides (`--set train.lr=3e-4`), cross-field validation, and serialisation of the
# resolved config that every run directory and checkpoint keeps.
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

import mgt_scale.config.strict_yaml as strict_yaml
from mgt_scale.config.schema import INT64_MAX, Config, ConfigError, MGTConfig
from mgt_scale.logs import get_logger

log = get_logger(__name__)
# ----------------------------------------------------------------------------------------------
# Strict conversion from plain dicts


class Sources:
    """Where each dotted key's value came from: the config file, or the `--set KEY=VALUE` that set it
    (or a section above it), so that an error names what the user has to change."""

    def __init__(self, base: str):
        self.base, self.overrides = base, {}

    def set(self, key: str, text: str) -> None:
        self.overrides = {k: v for k, v in self.overrides.items() if not k.startswith(key + ".")}
        self.overrides[key] = f"--set {text}"

    def of(self, *keys: str) -> str:
        found = []
        for key in keys:
            parts = re.sub(r"\[\d+\]", "", key).split(".")
            found += [self.overrides[k] for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1))
                      if k in self.overrides][:1]
        return ", ".join(dict.fromkeys(found)) or self.base


Source = typing.Union[str, Sources]


def _fail(source: Source, key: str, msg: str, *related: str) -> typing.NoReturn:
    """Raise `SOURCE: KEY: MSG`; SOURCE is the override that set `key` (or a `related` key), else the file."""
    where = source.of(key, *related) if isinstance(source, Sources) else source
    raise ConfigError(f"{where}: {key}: {msg}")


def _convert(value: Any, tp: Any, source: Source, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(source, key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, source, key)
    if origin is Literal:
        if value not in args:
            _fail(source, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            try:
                return _convert(value, a, source, key)
            except ConfigError as e:
                errors.append(str(e))
        _fail(source, key, f"value {value!r} matches none of {args}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(source, key, f"expected a list, got {type(value).__name__} {value!r}")
        elem = args[0]
        return tuple(_convert(v, elem, source, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(source, key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: accept numeric text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(source, key, f"expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            _fail(source, key, f"{value} is too large for a number")
    if tp is str:
        if not isinstance(value, str):
            _fail(source, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls: type, data: dict, source: Source, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            _fail(source, dotted, f"unknown key (known keys: {', '.join(sorted(names))})")
        kwargs[k] = _convert(v, hints[k], source, dotted)
    return cls(**kwargs)


def check_ranges(obj: Any, source: Source = "<config>", prefix: str = "") -> None:
    """Refuse NaN, inf and out-of-range values in every numeric field of `obj` (a config dataclass) and
    of the configs inside it, against the `Range` each field declares with `num`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, v in items:
            key = f"{prefix}{f.name}" + ("" if i is None else f"[{i}]")
            if dataclasses.is_dataclass(v):
                check_ranges(v, source, key + ".")
            elif isinstance(v, int) and abs(v) > INT64_MAX:
                _fail(source, key, f"{v} does not fit in 64 bits")
            elif "range" in f.metadata and v is not None and v not in f.metadata["range"]:
                what = "an integer" if isinstance(v, int) else "a finite number"
                _fail(source, key, f"must be {what} {f.metadata['range'].describe()}".rstrip() + f", got {v!r}")


def to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-safe dict of a config (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Overrides, loading, validation


def _yaml_load(text: str, where: str, path: str = "") -> Any:
    try:
        return strict_yaml.load(text, path)
    except strict_yaml.StrictYAMLError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 3e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text}: bad key {key!r}")
    return key, _yaml_load(raw, f"--set {text}", key) if raw.strip() else ""


def apply_override(data: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    cls: Any = Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            _fail(source, ".".join(parts[: i + 1]), f"unknown key (known keys: {', '.join(sorted(hints))})")
        cls = hints[part]
        if i == len(parts) - 1:
            node[part] = value
        else:
            if not dataclasses.is_dataclass(cls):
                _fail(source, ".".join(parts[: i + 1]), "is not a section")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                _fail(source, ".".join(parts[: i + 1]), "is not a section")


# keys of earlier versions that are accepted and ignored, so that their configs (and the config.yaml
# saved in every run directory, which resumption reads) still load: key -> (why, the old default). A
# value other than the old default is warned about on global rank 0 (INFO elsewhere: every rank loads
# the config at every restart, and 512 copies of one warning per requeue drown the log); the old default,
# which every saved config.yaml of those versions holds, is dropped silently.
RETIRED_KEYS = {"model.mgt.cpu_kernel": ("the C++ CPU kernel was retired; parallel.compile=blocks fuses the "
                                         "MGT update instead (bench/RESULTS.md section 6)", True),
                "train.fault_inject_nan_steps": ("a testing hook, now outside the trainer (tests/fault_hooks)", []),
                "monitor.probe_seed": ("nothing ever drew from it: the geometry probe is the first validation "
                                       "batch (monitor.probe_batch_size x monitor.probe_seq_len)", 4321)}
_NO_VALUE = object()


def _retired(key: str, source: str, value=_NO_VALUE) -> bool:
    """Whether `key` is retired (then, unless `value` is its old default, say so, naming the source)."""
    if key not in RETIRED_KEYS:
        return False
    why, old_default = RETIRED_KEYS[key]
    if value is _NO_VALUE or value != old_default:
        from mgt_scale.logs import process_rank
        (log.warning if process_rank() == 0 else log.info)(f"{source}: {key} is ignored: {why}")
    return True


def _drop_retired(data: dict, source: str) -> None:
    """Remove the retired keys from a nested config mapping (warning for each one found)."""
    for key in RETIRED_KEYS:
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and _retired(key, source, node[last]):
            del node[last]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config strictly, apply dotted overrides, validate. Raises ConfigError."""
    data: dict = {}
    sources = Sources("<defaults>")
    if path is not None:
        p = Path(path)
        sources.base = source = str(p)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = _yaml_load(p.read_text(), source)
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        data = loaded
        _drop_retired(data, source)
    for text in overrides:
        key, value = parse_override(text)
        if _retired(key, f"--set {text}", value):
            continue
        apply_override(data, key, value, f"--set {text}")
        sources.set(key, text)
    return _resolve(_build(Config, data, sources), sources)


def _resolve(cfg: Config, source: Source) -> Config:
    """Range checks, then the adjustments a user expects, then the checks across fields."""
    check_ranges(cfg, source)
    t = cfg.train
    if t.warmup_steps > t.max_steps:
        # e.g. `--set train.max_steps=20` on a config with warmup_steps=30: the whole run warms up.
        # Clamped here so that the config saved with the run holds what the LR schedule uses.
        log.warning(f"train.warmup_steps={t.warmup_steps} > train.max_steps={t.max_steps}: warm-up clamped "
                    f"to {t.max_steps}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, warmup_steps=t.max_steps))
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: Source = "<config>") -> None:
    """Every field against its declared range (`check_ranges`), then the checks that need more than one
    field. Topology against the world size is checked in mgt_scale.parallel.topology once the world
    size is known."""
    check_ranges(cfg, source)
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    if m.d_model % m.num_heads:
        _fail(source, "model.num_heads", f"d_model={m.d_model} is not divisible by num_heads={m.num_heads}",
              "model.d_model")
    if (m.d_model // m.num_heads) % 2:
        _fail(source, "model.num_heads", "head dimension d_model/num_heads must be even (rotary embeddings)",
              "model.d_model")
    if d.seq_len > m.max_seq_len:
        _fail(source, "data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}", "model.max_seq_len")
    if m.mgt.proj_init == "fan_in":
        for key in ("gate_init_std", "beta_init_std"):
            if getattr(m.mgt, key) != getattr(MGTConfig, key):
                _fail(source, f"model.mgt.{key}", "is only read with model.mgt.proj_init: std (now fan_in): "
                      "set model.mgt.proj_init=std to draw the projections with this std", "model.mgt.proj_init")
    if m.mgt.beta_input != MGTConfig.beta_input and m.residual not in ("mgt", "ddl"):
        # like gate_init_std above: a setting nothing reads is refused, not silently dropped
        _fail(source, "model.mgt.beta_input", f"{m.mgt.beta_input} is read only by the residual kinds with a "
              f"beta (mgt, ddl), not model.residual={m.residual}: remove it or pick one of those kinds",
              "model.residual")
    if m.mgt.proj_rank >= m.d_model:
        _fail(source, "model.mgt.proj_rank", f"must be in [0, d_model), got {m.mgt.proj_rank}", "model.d_model")
    if t.global_batch_size % t.micro_batch_size:
        _fail(source, "train.micro_batch_size",
              f"global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size={t.micro_batch_size}",
              "train.global_batch_size")
    if t.warmup_steps > t.max_steps:  # load_config clamps it; a Config built in code may not be
        _fail(source, "train.warmup_steps", f"must be in [0, max_steps={t.max_steps}], got {t.warmup_steps}",
              "train.max_steps")
    if p.mode == "pipeline" and p.zero_stage > 1:
        _fail(source, "parallel.zero_stage",
              f"ZeRO stage {p.zero_stage} is incompatible with DeepSpeed's pipeline engine "
              "(it supports ZeRO-0/1 only): set parallel.zero_stage=1 or parallel.mode=zero", "parallel.mode")
    if p.mode == "zero" and p.pipeline_stages != 1:
        _fail(source, "parallel.pipeline_stages", "must be 1 in zero mode (use parallel.mode=pipeline)",
              "parallel.mode")
    if p.mode == "zero" and p.zero_stage not in (1, 2, 3):
        _fail(source, "parallel.zero_stage", f"must be 1, 2 or 3 in zero mode, got {p.zero_stage}", "parallel.mode")
    if p.compile == "blocks" and p.mode == "zero" and p.zero_stage == 3 and p.zero3_fetch != "block":
        _fail(source, "parallel.compile", "blocks needs parallel.zero3_fetch=block under ZeRO-3 (per-module "
              "fetch hooks would run inside the compiled block)", "parallel.zero3_fetch")
    if p.mode == "pipeline" and p.pipeline_stages > m.num_layers:
        _fail(source, "parallel.pipeline_stages", f"{p.pipeline_stages} stages for {m.num_layers} layers",
              "model.num_layers")
    if not d.path and not d.blend and d.synthetic == "none":
        _fail(source, "data.path", "no training data: set data.path (a `mgt prep` output), data.blend, "
              "or data.synthetic", "data.blend", "data.synthetic")
    if d.copy_loss != "all" and d.synthetic != "copy":
        _fail(source, "data.copy_loss", f"{d.copy_loss} applies to the copy task only: set data.synthetic=copy "
              "or data.copy_loss=all", "data.synthetic")
    if cfg.monitor.interval > 0 and cfg.monitor.probe_seq_len > m.max_seq_len:
        _fail(source, "monitor.probe_seq_len", f"{cfg.monitor.probe_seq_len} exceeds model.max_seq_len={m.max_seq_len} "
              "(lower monitor.probe_seq_len, or set monitor.interval=0 to switch the probe off)",
              "model.max_seq_len", "monitor.interval")
    if cfg.log.wandb and not cfg.log.wandb_project:
        _fail(source, "log.wandb_project", "must be set when log.wandb is true", "log.wandb")


CONFIG_FILE = "config.yaml"  # the resolved config, saved in every run directory and with every checkpoint


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    data = copy.deepcopy(data)
    _drop_retired(data, source)
    return _resolve(_build(Config, data, source), source)
