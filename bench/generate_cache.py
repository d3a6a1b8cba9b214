# Time of `mgt generate`'s sampler for N new tokens with and without the KV cache, on a model of a
# config's shape with random weights (the weights do not change the time), greedy so both runs make
# the same tokens (checked). Usage:
#   python bench/generate_cache.py [--config configs/demo.yaml] [--new-tokens 200] [--prompt-len 16]
from __future__ import annotations

import argparse
import time

import torch

from mgt_scale.config import load_config
from mgt_scale.model import build_model
from mgt_scale.train.sampling import sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=16)
    args = ap.parse_args()
    cfg = load_config(args.config).model
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    sample(model, prompt, 2, 0.0, 0, cfg.max_seq_len)  # warm-up (builds the CPU kernel on first use)
    times, toks = {}, {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        toks[use_cache] = sample(model, prompt, args.new_tokens, 0.0, 0, cfg.max_seq_len, use_cache=use_cache)
        times[use_cache] = time.perf_counter() - t0
    print(f"{args.config}: {cfg.num_layers} layers, d={cfg.d_model}, max_seq_len {cfg.max_seq_len}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print(f"  KV cache:    {times[True]:7.2f} s  ({1e3 * times[True] / args.new_tokens:.1f} ms/token)")
    print(f"  no cache:    {times[False]:7.2f} s  ({1e3 * times[False] / args.new_tokens:.1f} ms/token)")
    print(f"  speed-up {times[False] / times[True]:.1f}x; same tokens: {toks[True] == toks[False]}")


if __name__ == "__main__":
    main()
