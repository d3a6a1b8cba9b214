# Our typed config -> the DeepSpeed JSON config. Nothing else in the project writes DeepSpeed keys.
from __future__ import annotations

from typing import Optional

from mgt_scale.config import Config
from mgt_scale.parallel.gpu_profile import JobShape, bf16_settings, detect_profile, shape_from_env, zero_settings
from mgt_scale.parallel.topology import BatchPlan


def resolve_precision(precision: str, has_cuda: bool, bf16_supported: bool) -> str:
    """`auto` = bf16 on GPUs that support it, fp32 otherwise (bf16 matmul on AVX2 CPUs is ~400x slower)."""
    if precision == "auto":
        return "bf16" if has_cuda and bf16_supported else "fp32"
    return precision


def detect_precision(precision: str) -> str:
    """`auto` resolved for this machine. bf16 only on GPUs that run it natively (Ampere and later):
    `is_bf16_supported()` by default also says yes to emulated bf16 (V100, T4), and it finds out by
    creating a tensor, which would make a CUDA context on GPU 0 from every rank before any has chosen
    its device. DS_ACCELERATOR set to something other than cuda means DeepSpeed will not train on the GPU."""
    import os

    import torch
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    return resolve_precision(precision, cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False))


def deepspeed_config(cfg: Config, plan: BatchPlan, precision: str, profile: Optional[str] = None,
                     shape: Optional[JobShape] = None) -> dict:
    """The DeepSpeed config dict. The optimizer and LR schedule are ours (torch AdamW and
    mgt_scale.train.schedule), handed to deepspeed.initialize, so they are not described here.
    `profile` ("cpu" or "gpu"; default: `parallel.profile` resolved for this machine) and `shape` (default:
    from LOCAL_WORLD_SIZE) choose the GPU profile's settings (mgt_scale/parallel/gpu_profile.py)."""
    p, t = cfg.parallel, cfg.train
    profile = profile or detect_profile(p.profile)
    shape = shape or shape_from_env(plan.world_size)
    if profile == "gpu" and precision == "bf16" and p.mode == "pipeline" and p.zero_stage == 0:
        raise ValueError("parallel.zero_stage=0 with bf16 in pipeline mode: DeepSpeed 0.19.8 then accumulates and "
                         "all-reduces gradients in bf16 (fp32 accumulation needs its BF16 optimizer, built with "
                         "ZeRO-1 only): set parallel.zero_stage=1, or parallel.precision=fp32")
    ds: dict = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
    }
    if p.mode == "zero":
        zero: dict = {"stage": p.zero_stage}
        if p.zero_stage == 3:
            zero.update({
                "contiguous_gradients": True,
                "overlap_comm": False,  # the cpu profile's; the gpu profile turns it on
                "stage3_gather_16bit_weights_on_model_save": False,
                # One rank: ZeRO's reduce-scatter only copies the whole gradient (an interleaving `cat`,
                # then the collective) before the copy into the partition; its all-reduce path works in
                # place on the contiguous gradient buffer, and an all-reduce over one rank moves
                # nothing. Same values (tests/unit/test_zero3_fetch.py). On more ranks reduce-scatter
                # moves half the bytes of an all-reduce, so it stays.
                "reduce_scatter": plan.data_parallel > 1,
                # DeepSpeed puts `zero3_linear_wrap` in place of F.linear: a Python autograd Function
                # that saves the weight Parameter itself, where torch's linear saves a transposed view
                # that would hold the gathered storage from forward to backward (DeepSpeed PR #8189).
                # On one rank with the parameters on the device, the "gathered" weight is a view of the
                # partition (NoGatherHandle in deepspeed/runtime/zero/partition_parameters.py), alive
                # anyway, so torch's linear holds nothing extra and skips the Python Function (a few
                # per cent of a step here, bench/RESULTS.md). Same numbers to float rounding
                # (tests/unit/test_zero3_fetch.py).
                "memory_efficient_linear": not (plan.data_parallel == 1 and p.offload_params != "cpu"),
            })
        if p.offload_optimizer == "cpu":
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if p.offload_params == "cpu":
            if p.zero_stage != 3:
                raise ValueError("parallel.offload_params=cpu needs parallel.zero_stage=3")
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
        if profile == "gpu":
            zero.update(zero_settings(cfg, plan, shape))
        ds["zero_optimization"] = zero
        # our torch AdamW works with offload: do not force DeepSpeed's compiled CPU Adam
        ds["zero_force_ds_cpu_optimizer"] = False
        ds["zero_allow_untested_optimizer"] = True
    else:
        ds["zero_optimization"] = {"stage": p.zero_stage}
        if profile == "gpu":
            ds["zero_optimization"].update(zero_settings(cfg, plan, shape))
        if p.zero_stage:
            ds["zero_allow_untested_optimizer"] = True
        ds["pipeline"] = {"activation_checkpoint_interval": p.checkpoint_every_layers
                          if p.activation_checkpointing else 0}
    if precision == "bf16" and profile == "gpu":  # the cpu profile keeps DeepSpeed's bf16 defaults
        ds.update(bf16_settings(cfg))
    return ds
