# `mgt generate SOURCE --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S] [--config FILE]`:
# sample a continuation with plain torch and a KV cache (mgt_scale.train.sampling) from an export
# (mgt_scale.train.export), a checkpoint directory or a run directory (mgt_scale.train.model_source).
# Text prompts need the tokenizer (the export's tokenizer.model, or the config's data directory's); else
# pass token ids with --prompt-ids 1,2,3. Bad input exits 2 (CONFIG_ERROR) with a one-line message.
from __future__ import annotations

import argparse
import sys

from mgt_scale.exit_codes import CONFIG_ERROR
from mgt_scale.logs import get_logger
from mgt_scale.train.sampling import sample


def fail(msg: str) -> int:
    """Log `msg` as an error; the exit code of bad input."""
    get_logger(__name__).error(msg)
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
