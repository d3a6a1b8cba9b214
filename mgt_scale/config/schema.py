# The run configuration's schema: one frozen dataclass per concern (model, data, parallel, train,
# checkpoint, monitor, log, run), each field documented where it is declared, each numeric field with
# its allowed range (`num`), read by mgt_scale.config.loading's strict checks.
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

RESIDUAL_KINDS = ("mgt", "mhc_gate", "ddl", "preln", "postln", "deepnorm", "mhc", "ddl_delta")
MGT_FAMILY = ("mgt", "mhc_gate", "ddl")


INT64_MAX = 2**63 - 1  # every int field must fit torch/numpy's int64; seeds ([0, INT64_MAX]) must be >= 0


class ConfigError(ValueError):
    """A configuration problem; the message names the file (or override) and the dotted key."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (of each element, for a tuple field); NaN and inf never are."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, v: float) -> bool:
        return (math.isfinite(v) and (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        """`in [0, 1)`, `>= 0`, `> 0`, ... or "" (any finite value)."""
        bounds = [(op, b) for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                  if b is not None]
        if len(bounds) == 2:
            (lo_op, lo), (hi_op, hi) = bounds
            return f"in {'[' if lo_op == '>=' else '('}{lo!s}, {hi!s}{']' if hi_op == '<=' else ')'}"
        return " ".join(f"{op} {b!s}" for op, b in bounds)


def num(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None) -> Any:
    """A numeric config field with its allowed range in the field metadata, where `check_ranges`
    reads it. Every int/float field must be declared this way (tests/unit/test_config.py checks);
    `num(0.0)` with no bounds still refuses NaN and inf."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt)})


@dataclass(frozen=True)
class MGTConfig:
    """Parameters of the MGT residual operators (`mgt`, `mhc_gate`, `ddl`).

    The paper (arXiv 2601.01014) gives no shapes or initial values, so these defaults are our choice:
    start close to a well-behaved pre-LN residual (beta clearly positive, no erasure: alpha = 0) and
    let training move beta anywhere in (eps - lam, eps + lam), including below zero (erasure).
    beta = lam * tanh(X @ W_beta + b_beta) + eps, so with lam=1, eps=0, b_beta=0.5 the initial
    beta is tanh(0.5) ~= 0.46 per channel, perturbed by W_beta.

    Projection init (`proj_init`): `fan_in` (default) draws W_gate and W_beta from N(0, 1/d_model), so
    X @ W has the per-entry variance of the stream X itself (init_std^2 = 4e-4 at the embedding, 40x
    LayerNorm's eps 1e-5): the gate's LN rescales it to unit variance and the gate varies, sigmoid(N(0,
    1)) = 0.50 +- 0.20; beta = tanh(0.5 + X W_beta) varies with the stream's scale (0.46 +- 0.016 at
    width 64, init_std 0.02). `std` draws them from N(0, gate_init_std) and N(0, beta_init_std): the
    previous default, 1e-3, leaves X @ W_gate at variance ~2.6e-8, far below LN's eps, so LN does not
    rescale it and the gate is 0.500 +- 0.013 and beta 0.4621 +- 1e-4 at init: MGT then starts as
    pre-LN with its branch scaled by ~0.23 (docs/RESULTS.md, finding 4). The std fields are read only
    with `proj_init: std`.
    """

    lam: float = num(1.0, ge=0)  # fixed amplitude of beta's tanh; beta ranges over (eps - lam, eps + lam)
    eps: float = num(0.0)  # fixed offset of beta
    beta_bias_init: float = num(0.5)  # initial b_beta (every entry)
    proj_init: Literal["fan_in", "std"] = "fan_in"  # W_gate, W_beta ~ N(0, 1/d_model), or N(0, *_init_std)
    beta_init_std: float = num(1e-3, ge=0)  # std of W_beta at init with proj_init: std
    gate_init_std: float = num(1e-3, ge=0)  # std of W_gate at init with proj_init: std (1e-3: gate dead at init)
    alpha_init: float = num(0.0)  # initial erasure strength alpha (learnable)
    beta_shape: Literal["channel", "token"] = "channel"  # beta per channel, or one scalar per token
    alpha_shape: Literal["scalar", "channel"] = "scalar"
    proj_rank: int = num(0, ge=0)  # 0: full d x d W_gate and W_beta (the paper); r > 0: low-rank d x r x d factors
    fused: bool = True  # fast path (one gate+beta matmul, fewer elementwise kernels); false: the paper op by op
    # what beta's projection reads: "x" the raw stream, beta = lam tanh(X W_beta + b) + eps (the paper), or
    # "ln" the sublayer's normalised input, beta = lam tanh(LN(X) W_beta + b) + eps (issue #33: a stream
    # that grows with depth cannot then saturate the tanh; with proj_init fan_in, LN(X) W_beta has unit
    # variance at init where X W_beta has the stream's, so beta starts spread, not at ~tanh(b_beta))
    beta_input: Literal["x", "ln"] = "x"


@dataclass(frozen=True)
class MHCConfig:
    """DeepSeek's manifold-constrained hyper-connections (`residual: mhc`, arXiv 2512.24880), the published
    mechanism that MGT's gate simplifies. The choices the paper leaves open are documented in
    mgt_scale.model.residual_baselines.MHCResidual."""

    num_streams: int = num(4, ge=1)  # n parallel residual streams (the paper: 4); 1 degenerates to pre-LN
    sinkhorn_iters: int = num(20, ge=1)  # Sinkhorn-Knopp iterations projecting H_res on the doubly stochastic matrices
    coef_scale_init: float = num(0.01, ge=0)  # a_pre, a_post, a_res at init (the paper's appendix: 0.01)
    # static logits at init: b_pre +g on stream (sublayer index mod n), -g elsewhere (HC's one-hot cycling);
    # b_res 0 on the diagonal, -g off it (H_res leaning to the identity); b_post 0 (H_post = 1, HC's B = 1).
    # g = 2: with g = 4, 20 Sinkhorn iterations leave column sums 1.4e-4 off at init (1e-10 with g = 2)
    init_logit_gap: float = num(2.0, ge=0)


@dataclass(frozen=True)
class DDLDeltaConfig:
    """Deep Delta Learning's delta operator (`residual: ddl_delta`, arXiv 2601.00417), value dimension 1:
    X + beta k (v - k^T X), the published mechanism that MGT's erasure term simplifies."""

    beta_init: float = num(1.0, gt=0, lt=2)  # beta = 2 sigmoid(w^T c + b) at init (b = logit(beta_init / 2))
    # v: "stream" = value_scale * sigmoid(w_v^T X + b_v) (the authors' code); "norm" = w_v^T LN(X) + b_v (the
    # paper's projection of c); "sublayer" = w_v^T F(LN(X)) + b_v (a value read from the sublayer output)
    value: Literal["stream", "norm", "sublayer"] = "stream"
    value_scale: float = num(4.0, gt=0)  # the authors' code's 4 in 4 sigmoid(.) (value: stream only)
    k_eps: float = num(1e-5, gt=0)  # k = F / sqrt(||F||^2 + k_eps^2)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and residual kind of the Transformer stack (see mgt_scale.model.init_weights for init)."""

    num_layers: int = num(8, ge=1)
    d_model: int = num(128, ge=1)
    num_heads: int = num(4, ge=1)
    d_ff: int = num(512, ge=1)
    vocab_size: int = num(2048, ge=2)
    max_seq_len: int = num(256, ge=1)
    residual: Literal["mgt", "mhc_gate", "ddl", "preln", "postln", "deepnorm", "mhc", "ddl_delta"] = "mgt"
    init_std: float = num(0.02, gt=0)
    depth_scaled_init: bool = True  # output projections get std * (2 * num_layers) ** -0.5
    tie_embeddings: bool = False
    norm_eps: float = num(1e-5, gt=0)  # LayerNorm's epsilon: 0 divides by zero on a constant row
    rope_base: float = num(10000.0, gt=1)  # rotary base: <= 1 gives no decreasing frequencies
    mgt: MGTConfig = field(default_factory=MGTConfig)
    mhc: MHCConfig = field(default_factory=MHCConfig)  # residual: mhc (DeepSeek's mHC)
    ddl_delta: DDLDeltaConfig = field(default_factory=DDLDeltaConfig)  # residual: ddl_delta (DDL's delta operator)

    @property
    def stream_width(self) -> int:
        """Width of the residual stream between blocks: d_model, or num_streams * d_model for `mhc`."""
        return self.d_model * (self.mhc.num_streams if self.residual == "mhc" else 1)


@dataclass(frozen=True)
class BlendSource:
    path: str
    weight: float = num(1.0, gt=0)


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from. `path` is a shard directory written by `mgt prep`;
    `blend` (optional) lists several shard directories with Megatron-style weights instead."""

    path: str = ""
    blend: tuple[BlendSource, ...] = ()
    seq_len: int = num(128, ge=1)
    seed: int = num(1234, ge=0, le=INT64_MAX)
    prefetch: int = num(4, ge=0)  # batches prepared ahead by the background thread (0: synchronous)
    valid_fraction_batches: int = num(4, ge=0)  # validation batches evaluated at each eval
    synthetic: Literal["none", "copy", "random"] = "none"  # generated data instead of shards
    # copy task (synthetic: copy): the training and validation loss over every position ("all"), or over
    # the copied half only ("copied": the positions that predict the copy; the first half is noise)
    copy_loss: Literal["all", "copied"] = "all"
    verify_checksums: bool = True  # sha256 every shard when the loader opens it (size/counts: always)


@dataclass(frozen=True)
class ParallelConfig:
    """Engine mode and topology. world size = pipeline_stages x data-parallel size."""

    # "zero": DeepSpeed ZeRO over all ranks (stages 1-3, `zero_stage`); "zero3" is its old name, accepted and
    # normalised to "zero" (saved configs and checkpoint manifests say "zero" from then on: canonical_mode)
    mode: Literal["zero", "zero3", "pipeline"] = "zero"
    zero_stage: int = num(3, ge=0, le=3)  # zero mode: 3 (1 and 2 allowed for experiments); pipeline mode: 0 or 1 only
    pipeline_stages: int = num(1, ge=1)
    # how pipeline stages are cut: "flops" balances the training FLOPs of each stage's layers (blocks,
    # LM head; the embedding lookup costs ~0), mgt_scale.parallel.pipeline.layer_costs; "parameters"
    # (DeepSpeed's: equal parameter counts, the embedding counted like a block), "uniform" (equal layer
    # counts), "type:Block" (equal block counts)
    partition_method: Literal["flops", "parameters", "uniform", "type:Block"] = "flops"
    # pipeline bubble (stages - 1) / (micro batches + stages - 1) above which a run warns; fewer micro
    # batches than stages is refused (mgt_scale.parallel.topology.plan_batch)
    bubble_warn_fraction: float = num(0.25, ge=0, le=1)
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    activation_checkpointing: bool = False
    checkpoint_every_layers: int = num(1, ge=1)  # checkpoint every k blocks (k consecutive blocks per segment)
    # "full": recompute each segment's whole forward in the backward; "selective": keep the outputs of the
    # matmuls that narrow their input (FFN down-projection, low-rank down-projections), recompute the rest
    checkpoint_policy: Literal["full", "selective"] = "full"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # ZeRO-3 parameter gathering: "block" fetches and releases each transformer block's parameters
    # as one unit (DeepSpeed z3 leaf modules: one hook pair per block); "module" is DeepSpeed's
    # default, hooks on every nn.Module (about 10 per block). Same numbers, fewer hooks.
    zero3_fetch: Literal["block", "module"] = "block"
    # DeepSpeed settings profile (mgt_scale/parallel/gpu_profile.py): "gpu" overlaps ZeRO's communication
    # with compute and sizes its buckets from the largest block; "cpu" keeps the settings the CPU (gloo)
    # runs were measured with; "auto": gpu when CUDA is the accelerator
    profile: Literal["auto", "cpu", "gpu"] = "auto"
    # ZeRO-3 on several nodes (gpu profile): "node" keeps a second copy of the parameters partitioned over
    # each node's GPUs (ZeRO++ hpZ, zero_hpz_partition_size = GPUs per node), so the backward's all-gathers
    # stay on NVLink; "none": every all-gather spans all nodes
    hierarchical_partition: Literal["node", "none"] = "node"
    # memory of one GPU (GB) for the gpu profile's estimate (the plan is made on any machine, so it is not
    # read from a device: 80 = A100/H100 80GB); hpZ is turned off when the estimate with it (model states,
    # gathered parameters, buckets, the secondary copy; activations not counted) exceeds this fraction
    gpu_memory_gb: float = num(80.0, gt=0)
    hpz_memory_fraction: float = num(0.75, gt=0, le=1)
    # timeout of every collective of the process group (torch's default is 10 minutes for NCCL): long
    # enough for a rank-0 step that others wait on at scale (a universal conversion at resume)
    dist_timeout_minutes: float = num(60.0, gt=0, le=10080)
    # "blocks": torch.compile (inductor) each transformer block's forward in place, applied by both engines
    # (mgt_scale/parallel/compile.py): the MGT update, rotary and GELU chains fused; "none": eager
    compile: Literal["none", "blocks"] = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", canonical_mode(self.mode))


MODE_ALIASES = {"zero3": "zero"}


def canonical_mode(mode: str) -> str:
    """`parallel.mode` (or a checkpoint manifest's `mode`) under its canonical name: "zero3" -> "zero"."""
    return MODE_ALIASES.get(mode, mode)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = num(300, ge=1)
    global_batch_size: int = num(16, ge=1)
    micro_batch_size: int = num(8, ge=1)
    lr: float = num(3e-3, gt=0)
    min_lr_ratio: float = num(0.1, ge=0, le=1)  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = num(30, ge=0)  # more than max_steps: clamped to max_steps at load, with a warning
    weight_decay: float = num(0.1, ge=0)
    beta1: float = num(0.9, ge=0, lt=1)  # AdamW's betas: torch refuses values outside [0, 1)
    beta2: float = num(0.95, ge=0, lt=1)
    grad_clip: float = num(1.0, ge=0)  # max global gradient norm; 0: no clipping (DeepSpeed's meaning)
    # torch AdamW's fused kernel (one pass over each tensor, CPU and CUDA); false: its per-tensor loop of
    # ~7 elementwise kernels per tensor. Same update to rounding; bench/RESULTS.md has the timings.
    fused_adamw: bool = True
    seed: int = num(0, ge=0, le=INT64_MAX)
    log_interval: int = num(10, ge=1)
    eval_interval: int = num(0, ge=0)  # 0: evaluate only at the end
    max_wall_time: float = num(0.0, ge=0)  # seconds; 0 = unlimited. Saves and exits before the budget runs out.
    peak_flops: float = num(0.0, ge=0)  # per-device peak FLOP/s for MFU; 0 = detect (GPU) or skip
    max_consecutive_nonfinite: int = num(3, ge=1)
    nonfinite_policy: Literal["rollback", "stop"] = "rollback"
    spike_zscore: float = num(6.0, ge=0)  # 0: no spike detection


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = num(0, ge=0)  # save every N steps (0: only at the end)
    keep_last: int = num(2, ge=1)
    keep_every: int = num(0, ge=0)  # also keep every M-th step's checkpoint (0: none)
    save_at_end: bool = True
    # write the files in a background thread while training goes on (the step loop waits only for a copy
    # of the state in host memory); the manifest and `latest_good` move once every rank's write is done
    async_save: bool = False
    # at resume each rank hashes only its own share of the chosen checkpoint ("shared"), or every file
    # ("full": paranoid, I/O = ranks x checkpoint size); `mgt ckpt verify` always checks everything
    verify: Literal["shared", "full"] = "shared"
    reshard_workers: int = num(0, ge=0, le=1024)  # ds_to_universal worker processes (0: this node's CPUs, up to 32)


@dataclass(frozen=True)
class MonitorConfig:
    interval: int = num(50, ge=0)  # geometry probe every N steps (0: off)
    probe_batch_size: int = num(4, ge=1)
    probe_seq_len: int = num(64, ge=1)
    alarm_eff_rank_norm_below: float = num(0.0, ge=0, le=1)  # 0: off. e.g. 0.1
    alarm_cosine_above: float = num(0.0, ge=0, le=1)  # 0: off. e.g. 0.95
    alarm_policy: Literal["warn", "checkpoint_and_stop", "rollback"] = "warn"
    alarm_after_step: int = num(0, ge=0)  # alarms only fire from this step on
    alarm_max_rollbacks: int = num(2, ge=0)  # policy rollback: after this many rollbacks an alarm escalates to checkpoint_and_stop
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
