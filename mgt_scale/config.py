# Typed, strict run configuration: one dataclass per concern, YAML loading that rejects unknown keys,
# wrong types and impossible values with the file and dotted key in the message, dotted overrides
# (`--set train.lr=3e-4`), and serialisation of the resolved config that every run directory keeps.
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RESIDUAL_KINDS = ("mgt", "mhc_gate", "ddl", "preln", "postln", "deepnorm")
MGT_FAMILY = ("mgt", "mhc_gate", "ddl")


class ConfigError(ValueError):
    """A configuration problem; the message names the file (or override) and the dotted key."""


@dataclass(frozen=True)
class MGTConfig:
    """Parameters of the MGT residual operators (`mgt`, `mhc_gate`, `ddl`).

    The paper (arXiv 2601.01014) gives no shapes or initial values, so these defaults are our choice:
    start close to a well-behaved pre-LN residual (beta clearly positive, no erasure: alpha = 0) and
    let training move beta anywhere in (eps - lam, eps + lam), including below zero (erasure).
    beta = lam * tanh(X @ W_beta + b_beta) + eps, so with lam=1, eps=0, b_beta=0.5 the initial
    beta is tanh(0.5) ~= 0.46 per channel, perturbed by the small W_beta.
    """

    lam: float = 1.0  # fixed amplitude of beta's tanh; beta ranges over (eps - lam, eps + lam)
    eps: float = 0.0  # fixed offset of beta
    beta_bias_init: float = 0.5  # initial b_beta (every entry)
    beta_init_std: float = 1e-3  # std of W_beta at init
    gate_init_std: float = 1e-3  # std of W_gate at init (LN after the projection makes the gate scale-free)
    alpha_init: float = 0.0  # initial erasure strength alpha (learnable)
    beta_shape: Literal["channel", "token"] = "channel"  # beta per channel, or one scalar per token
    alpha_shape: Literal["scalar", "channel"] = "scalar"
    proj_rank: int = 0  # 0: full d x d W_gate and W_beta (the paper); r > 0: low-rank d x r x d factors
    fused: bool = True  # fast path (one gate+beta matmul, fewer elementwise kernels); false: the paper op by op
    # with `fused`, on an AVX2 CPU in fp32: the update's elementwise chain (gate LN, sigmoid, beta, update) as
    # one compiled C++ kernel, forward and backward (mgt_scale/model/cpu_kernel.py); false: torch ops
    cpu_kernel: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Shape and residual kind of the Transformer stack (see mgt_scale.model.init_weights for init)."""

    num_layers: int = 8
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 512
    vocab_size: int = 2048
    max_seq_len: int = 256
    residual: Literal["mgt", "mhc_gate", "ddl", "preln", "postln", "deepnorm"] = "mgt"
    init_std: float = 0.02
    depth_scaled_init: bool = True  # output projections get std * (2 * num_layers) ** -0.5
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    mgt: MGTConfig = field(default_factory=MGTConfig)


@dataclass(frozen=True)
class BlendSource:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from. `path` is a shard directory written by `mgt prep`;
    `blend` (optional) lists several shard directories with Megatron-style weights instead."""

    path: str = ""
    blend: tuple[BlendSource, ...] = ()
    seq_len: int = 128
    seed: int = 1234
    prefetch: int = 4  # batches prepared ahead by the background thread (0: synchronous)
    valid_fraction_batches: int = 4  # validation batches evaluated at each eval
    synthetic: Literal["none", "copy", "random"] = "none"  # generated data instead of shards
    verify_checksums: bool = True  # sha256 every shard when the loader opens it (size/counts: always)


@dataclass(frozen=True)
class ParallelConfig:
    """Engine mode and topology. world size = pipeline_stages x data-parallel size."""

    mode: Literal["zero3", "pipeline"] = "zero3"
    zero_stage: int = 3  # zero3 mode: 3 (1 and 2 allowed for experiments); pipeline mode: 0 or 1 only
    pipeline_stages: int = 1
    partition_method: Literal["parameters", "uniform", "type:Block"] = "parameters"
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    activation_checkpointing: bool = False
    checkpoint_every_layers: int = 1  # checkpoint every k blocks (k consecutive blocks per segment)
    # "full": recompute each segment's whole forward in the backward; "selective": keep the outputs of the
    # matmuls that narrow their input (FFN down-projection, low-rank down-projections), recompute the rest
    checkpoint_policy: Literal["full", "selective"] = "full"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # ZeRO-3 parameter gathering: "block" fetches and releases each transformer block's parameters
    # as one unit (DeepSpeed z3 leaf modules: one hook pair per block); "module" is DeepSpeed's
    # default, hooks on every nn.Module (about 10 per block). Same numbers, fewer hooks.
    zero3_fetch: Literal["block", "module"] = "block"


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 300
    global_batch_size: int = 16
    micro_batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # torch AdamW's fused kernel (one pass over each tensor, CPU and CUDA); false: its per-tensor loop of
    # ~7 elementwise kernels per tensor. Same update to rounding; bench/RESULTS.md has the timings.
    fused_adamw: bool = True
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 0  # 0: evaluate only at the end
    max_wall_time: float = 0.0  # seconds; 0 = unlimited. Saves and exits before the budget runs out.
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = detect (GPU) or skip
    max_consecutive_nonfinite: int = 3
    nonfinite_policy: Literal["rollback", "stop"] = "rollback"
    spike_zscore: float = 6.0
    fault_inject_nan_steps: tuple[int, ...] = ()  # testing hook: make the loss NaN at these steps


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 2
    keep_every: int = 0  # also keep every M-th step's checkpoint (0: none)
    save_at_end: bool = True


@dataclass(frozen=True)
class MonitorConfig:
    interval: int = 50  # geometry probe every N steps (0: off)
    probe_batch_size: int = 4
    probe_seq_len: int = 64
    probe_seed: int = 4321
    alarm_eff_rank_norm_below: float = 0.0  # 0: off. e.g. 0.1
    alarm_cosine_above: float = 0.0  # 0: off. e.g. 0.95
    alarm_policy: Literal["warn", "checkpoint_and_stop", "rollback"] = "warn"
    alarm_after_step: int = 0  # alarms only fire from this step on
    alarm_max_rollbacks: int = 2  # policy rollback: after this many rollbacks an alarm escalates to checkpoint_and_stop
    geometry_center: bool = False  # mean-centre each sequence before the SVD metrics (default: raw, see monitor.metrics)


@dataclass(frozen=True)
class LogConfig:
    wandb: bool = False
    wandb_project: str = "mgt-scale"
    wandb_entity: str = ""  # "" = the account default
    wandb_group: str = ""
    # auto: offline unless an API key is configured; the WANDB_MODE environment variable always wins
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tensorboard: bool = False


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/demo"
    name: str = "demo"


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------------------------
# Strict conversion from plain dicts


def _fail(source: str, key: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {key}: {msg}")


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(source, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            _fail(source, dotted, f"unknown key (known keys: {', '.join(sorted(names))})")
        kwargs[k] = _convert(v, hints[k], source, dotted)
    return cls(**kwargs)


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


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 3e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key, value


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


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config strictly, apply dotted overrides, validate. Raises ConfigError."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: invalid YAML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        data = loaded
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value, f"override --set {text}")
    cfg = _build(Config, data, source)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "<config>") -> None:
    """Checks that need more than one field or a range. Topology against the world size is checked
    in mgt_scale.parallel.topology once the world size is known."""
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data

    def positive(section: str, obj: Any, *names: str) -> None:
        for n in names:
            if getattr(obj, n) <= 0:
                _fail(source, f"{section}.{n}", f"must be > 0, got {getattr(obj, n)}")

    positive("model", m, "num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "max_seq_len", "init_std")
    positive("train", t, "max_steps", "global_batch_size", "micro_batch_size", "lr", "log_interval")
    positive("data", d, "seq_len")
    positive("parallel", p, "pipeline_stages", "checkpoint_every_layers")
    if m.d_model % m.num_heads:
        _fail(source, "model.num_heads", f"d_model={m.d_model} is not divisible by num_heads={m.num_heads}")
    if (m.d_model // m.num_heads) % 2:
        _fail(source, "model.num_heads", "head dimension d_model/num_heads must be even (rotary embeddings)")
    if d.seq_len > m.max_seq_len:
        _fail(source, "data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.mgt.lam < 0:
        _fail(source, "model.mgt.lam", f"must be >= 0, got {m.mgt.lam}")
    if m.mgt.proj_rank < 0 or m.mgt.proj_rank >= m.d_model:
        _fail(source, "model.mgt.proj_rank", f"must be in [0, d_model), got {m.mgt.proj_rank}")
    if t.global_batch_size % t.micro_batch_size:
        _fail(source, "train.micro_batch_size",
              f"global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size={t.micro_batch_size}")
    if not 0 <= t.min_lr_ratio <= 1:
        _fail(source, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps < 0 or t.warmup_steps > t.max_steps:
        _fail(source, "train.warmup_steps", f"must be in [0, max_steps={t.max_steps}], got {t.warmup_steps}")
    if p.mode == "pipeline" and p.zero_stage > 1:
        _fail(source, "parallel.zero_stage",
              f"ZeRO stage {p.zero_stage} is incompatible with DeepSpeed's pipeline engine "
              "(it supports ZeRO-0/1 only): set parallel.zero_stage=1 or parallel.mode=zero3")
    if p.mode == "zero3" and p.pipeline_stages != 1:
        _fail(source, "parallel.pipeline_stages", "must be 1 in zero3 mode (use parallel.mode=pipeline)")
    if p.mode == "zero3" and p.zero_stage not in (1, 2, 3):
        _fail(source, "parallel.zero_stage", f"must be 1, 2 or 3 in zero3 mode, got {p.zero_stage}")
    if p.mode == "pipeline" and p.pipeline_stages > m.num_layers:
        _fail(source, "parallel.pipeline_stages", f"{p.pipeline_stages} stages for {m.num_layers} layers")
    if not d.path and not d.blend and d.synthetic == "none":
        _fail(source, "data.path", "no training data: set data.path (a `mgt prep` output), data.blend, "
              "or data.synthetic")
    for i, b in enumerate(d.blend):
        if b.weight <= 0:
            _fail(source, f"data.blend[{i}].weight", f"must be > 0, got {b.weight}")
    for name in ("interval", "keep_every"):
        if getattr(cfg.checkpoint, name) < 0:
            _fail(source, f"checkpoint.{name}", "must be >= 0")
    if cfg.checkpoint.keep_last < 1:
        _fail(source, "checkpoint.keep_last", "must be >= 1")
    if cfg.monitor.interval < 0:
        _fail(source, "monitor.interval", "must be >= 0")
    positive("monitor", cfg.monitor, "probe_batch_size", "probe_seq_len")
    if cfg.monitor.interval > 0 and cfg.monitor.probe_seq_len > m.max_seq_len:
        _fail(source, "monitor.probe_seq_len", f"{cfg.monitor.probe_seq_len} exceeds model.max_seq_len={m.max_seq_len} "
              "(lower monitor.probe_seq_len, or set monitor.interval=0 to switch the probe off)")
    for name in ("alarm_eff_rank_norm_below", "alarm_cosine_above"):
        if not 0 <= getattr(cfg.monitor, name) <= 1:
            _fail(source, f"monitor.{name}", f"must be in [0, 1] (0: off), got {getattr(cfg.monitor, name)}")
    for name in ("alarm_after_step", "alarm_max_rollbacks"):
        if getattr(cfg.monitor, name) < 0:
            _fail(source, f"monitor.{name}", "must be >= 0")
    if cfg.log.wandb and not cfg.log.wandb_project:
        _fail(source, "log.wandb_project", "must be set when log.wandb is true")
    if t.max_wall_time < 0:
        _fail(source, "train.max_wall_time", "must be >= 0")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, data, source)
    validate(cfg, source)
    return cfg
