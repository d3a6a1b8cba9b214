# Data pipeline: `mgt prep` (tokenizer + token shards, mgt_scale.data.prep), the shard format
# (mgt_scale.data.shards) and the resumable, rank-aware loader the trainer uses (loader, sampler,
# synthetic). The public names below are the API the trainer and tools import; they are loaded
# lazily so `mgt prep --help` does not pay for importing torch.
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_train_loader": "loader", "build_valid_batches": "loader", "dataset_vocab_size": "loader",
    "data_tokenizer_identity": "loader", "verify_data_once": "loader",
    "TrainLoader": "loader", "ShardSampleSource": "loader", "build_sampler": "loader", "open_shards": "loader",
    "GlobalSampler": "sampler", "SampleOrder": "sampler", "build_blending_indices": "sampler",
    "rank_slice": "sampler",
    "DataError": "shards", "ShardSet": "shards", "check_output": "shards", "load_manifest": "shards",
    "verify_output": "shards",
    "copy_task_mask": "synthetic", "CopyTaskSource": "synthetic", "RandomTokenSource": "synthetic",
    "Tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
