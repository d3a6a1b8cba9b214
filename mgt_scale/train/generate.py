# `mgt generate EXPORT_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S]`: sample a
# continuation from an exported model (see mgt_scale.train.export) with plain torch. Text prompts need
# the export's tokenizer.model; without one pass token ids with --prompt-ids 1,2,3.
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


@torch.no_grad()
def sample(model, ids: list[int], max_new_tokens: int, temperature: float, seed: int, max_seq_len: int) -> list[int]:
    """Autoregressive sampling (temperature 0: greedy); the context is cut to the model's max_seq_len."""
    gen = torch.Generator().manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([out[-max_seq_len:]], dtype=torch.long)
        logits = model(x)[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
    return out[len(ids):]


def main(argv: list[str] | None = None) -> int:
    from mgt_scale.train.export import ExportError, load_exported
    ap = argparse.ArgumentParser(prog="mgt generate", description="Sample a continuation from an exported model.")
    ap.add_argument("export_dir")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (needs tokenizer.model in the export directory)")
    g.add_argument("--prompt-ids", help="comma-separated token ids (no tokenizer needed)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        model, cfg = load_exported(args.export_dir)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = None
    tok_path = Path(args.export_dir) / "tokenizer.model"
    if args.prompt is not None:
        if not tok_path.is_file():
            print(f"error: {tok_path} not found: pass token ids with --prompt-ids", file=sys.stderr)
            return 2
        from mgt_scale.data.tokenizer import Tokenizer
        tok = Tokenizer(tok_path)
        ids = tok.encode(args.prompt)
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            print(f"error: --prompt-ids {args.prompt_ids!r}: expected comma-separated integers", file=sys.stderr)
            return 2
    if not ids or max(ids) >= cfg.model.vocab_size or min(ids) < 0:
        print(f"error: prompt ids must be non-empty and in [0, {cfg.model.vocab_size})", file=sys.stderr)
        return 2
    new = sample(model, ids, args.max_new_tokens, args.temperature, args.seed, cfg.model.max_seq_len)
    if tok is not None:
        print(args.prompt + tok.decode(new))
    else:
        print(",".join(str(i) for i in new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
