# Time of transformers' generate() on a Hugging Face export (`mgt export --format hf`) for N new tokens
# with and without the KV cache, on a model of a config's shape with random weights, greedy so both runs
# make the same tokens (checked), beside `mgt generate`'s own sampler with the cache. Usage:
#   OMP_NUM_THREADS=1 python bench/hf_generate_cache.py [--config configs/demo.yaml] [--new-tokens 200]
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mgt_scale.config import load_config
from mgt_scale.hf.export_hf import write_hf
from mgt_scale.model import build_model
from mgt_scale.train.sampling import sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=16)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    cfg = load_config(args.config).model
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as d:
        write_hf(model, cfg, None, d, log=lambda *a: None)
        hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    times, toks = {}, {}
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    hf.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
    for use_cache in (True, False):
        t0 = time.perf_counter()
        toks[use_cache] = hf.generate(prompt, use_cache=use_cache, **kw)[0, args.prompt_len:].tolist()
        times[use_cache] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = sample(model, prompt[0].tolist(), n, 0.0, 0, cfg.max_seq_len)
    t_ours = time.perf_counter() - t0
    print(f"{args.config}: {cfg.num_layers} layers, d={cfg.d_model}, prompt {args.prompt_len}, {n} new tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  transformers generate, KV cache: {times[True]:7.2f} s")
    print(f"  transformers generate, no cache: {times[False]:7.2f} s")
    print(f"  mgt generate's sampler, KV cache: {t_ours:7.2f} s")
    print(f"  same tokens: cache/no cache {toks[True] == toks[False]}, transformers/mgt {toks[True] == ours}")


if __name__ == "__main__":
    main()
