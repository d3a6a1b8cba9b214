# `mgt generate SOURCE --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S] [--config FILE]`:
# sample a continuation with plain torch and a KV cache from an export (mgt_scale.train.export), a
# checkpoint directory or a run directory (mgt_scale.train.model_source). Text prompts need the
# tokenizer (the export's tokenizer.model, or the config's data directory's); else pass token ids with
# --prompt-ids 1,2,3. Bad input exits 2 (CONFIG_ERROR) with a one-line message.
from __future__ import annotations

import argparse
import sys

import torch

from mgt_scale.exit_codes import CONFIG_ERROR


@torch.no_grad()
def sample(model, ids: list[int], max_new_tokens: int, temperature: float, seed: int, max_seq_len: int,
           use_cache: bool = True, vocab_limit: int | None = None) -> list[int]:
    """Autoregressive sampling (temperature 0: greedy); the context is cut to the model's max_seq_len.

    With `use_cache` the prompt is run once and each new token then costs a one-position forward
    against the KV cache. Once the context is longer than max_seq_len, every step recomputes on the
    cut window of the last max_seq_len tokens, without a cache, exactly as the uncached sampler does:
    a sliding cache would keep hidden states computed with tokens that have left the window (and
    positions past max_seq_len), so its logits would differ from the model's on that window.
    `vocab_limit`: sample only among ids below it (the tokenizer's pieces), the rest masked."""
    from mgt_scale.model import KVCache
    gen = torch.Generator().manual_seed(seed)
    out = list(ids)
    cache = KVCache(len(model.blocks)) if use_cache else None
    for _ in range(max_new_tokens):
        if cache is not None and len(out) <= max_seq_len:
            # positions 0 .. len(out)-1: feed those not in the cache yet (the prompt, then one token)
            x = torch.tensor([out[cache.length:]], dtype=torch.long)
            logits = model(x, cache=cache)[0, -1].float()
        else:
            x = torch.tensor([out[-max_seq_len:]], dtype=torch.long)
            logits = model(x)[0, -1].float()
        if vocab_limit is not None and vocab_limit < logits.numel():
            logits[vocab_limit:] = float("-inf")
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
    return out[len(ids):]


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return CONFIG_ERROR


def main(argv: list[str] | None = None) -> int:
    from mgt_scale.train.model_source import SourceError, open_model
    ap = argparse.ArgumentParser(prog="mgt generate", description="Sample a continuation from a trained model: an "
                                 "export directory, a checkpoint directory or a run directory (its latest good "
                                 "checkpoint, consolidated in memory).")
    ap.add_argument("source", help="export dir (`mgt export`), model.safetensors, checkpoint dir or run dir")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (needs the tokenizer: tokenizer.model in the export directory, "
                   "or in the config's data.path)")
    g.add_argument("--prompt-ids", help="comma-separated token ids (no tokenizer needed)")
    ap.add_argument("--config", default=None, help="config to build the model from (default: the one saved with "
                    "the weights); checked against the weights")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token "
                    "(the KV cache gives the same tokens, much faster)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 0:
        return fail(f"--max-new-tokens {args.max_new_tokens}: expected 0 or more")
    try:
        src = open_model(args.source, args.config)
    except SourceError as e:
        return fail(str(e))
    cfg, vocab = src.cfg, src.cfg.model.vocab_size
    tok = None
    if args.prompt is not None:
        if src.tokenizer is None:
            return fail(f"{args.source}: no tokenizer.model (next to the weights or in data.path "
                        f"{cfg.data.path or '(unset)'}): pass token ids with --prompt-ids")
        from mgt_scale.data.shards import DataError
        from mgt_scale.data.tokenizer import Tokenizer
        try:
            tok = Tokenizer(src.tokenizer)
        except DataError as e:
            return fail(str(e))
        if tok.vocab_size > vocab:
            return fail(f"tokenizer {src.tokenizer} has {tok.vocab_size} pieces but the model's vocab_size is "
                        f"{vocab}: use the tokenizer the model was trained with")
        ids = tok.encode(args.prompt)
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            return fail(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers")
    if not ids or max(ids) >= vocab or min(ids) < 0:
        return fail(f"prompt ids must be non-empty and in [0, {vocab})")
    # a model vocabulary padded past the tokenizer's: ids the tokenizer cannot decode are never sampled
    new = sample(src.model, ids, args.max_new_tokens, args.temperature, args.seed, cfg.model.max_seq_len,
                 use_cache=not args.no_cache, vocab_limit=tok.vocab_size if tok is not None else None)
    if tok is not None:
        print(args.prompt + tok.decode(new))
    else:
        print(",".join(str(i) for i in new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
