#!/usr/bin/env python
# The trivial-model baseline of the LM sweeps: the cross-entropy (nats/token) of a unigram model fitted on
# the train split (add-one smoothing), on the whole valid split and on exactly the validation batches a
# run config evaluates (`mgt train`'s valid loss). Usage: python scripts/unigram_loss.py CONFIG [--set k=v ...]
"""A trained LM that does not beat this number has not learned more than token frequencies."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    from mgt_scale.config import load_config
    from mgt_scale.data import build_valid_batches
    from mgt_scale.data.loader import open_shards
    cfg = load_config(args.config, args.overrides)
    shards = open_shards(cfg.data.path, full_checksums=False)
    v = cfg.model.vocab_size
    counts = {}
    for split in ("train", "valid"):
        c = np.zeros(v, dtype=np.float64)
        for sh in shards.manifest["splits"][split]["shards"]:
            toks = np.fromfile(f"{cfg.data.path}/{sh['file']}", dtype=shards.manifest["dtype"])
            c += np.bincount(toks, minlength=v)[:v]
        counts[split] = c
    logp = np.log((counts["train"] + 1.0) / (counts["train"].sum() + v))  # add-one smoothing, float64
    valid = counts["valid"]
    out = {"unigram_loss_valid_split": float(-(valid * logp).sum() / valid.sum()),
           "valid_split_own_entropy": float(-(valid[valid > 0] / valid.sum() * np.log(valid[valid > 0] / valid.sum())).sum()),
           "valid_tokens": int(valid.sum())}
    t = cfg.train
    batches = build_valid_batches(cfg.data, cfg.data.seq_len, t.micro_batch_size, cfg.data.valid_fraction_batches, v)
    targets = np.concatenate([y.numpy().reshape(-1) for _, y in batches])
    out["unigram_loss_eval_batches"] = float(-logp[targets].mean())
    out["eval_batch_tokens"] = int(targets.size)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
