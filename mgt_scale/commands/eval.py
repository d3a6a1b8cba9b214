# `mgt eval SOURCE --text FILE [FILE ...] [--json OUT] [--keep-export DIR]`: perplexity of a trained model
# (run, checkpoint or export directory) on local text files through lm-evaluation-harness: the model is
# exported for transformers (mgt_scale/hf/export_hf.py) into a temporary directory, lm-eval runs the
# `mgt_text` task on it in this process (hf/lm_eval_task.py), and our own loss on the same windows
# (hf/text_loss.py) is printed beside it. Bad input exits 2 (CONFIG_ERROR); the `eval` extra must be
# installed.
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path

from mgt_scale.exit_codes import CONFIG_ERROR
from mgt_scale.logs import get_logger


def fail(msg: str) -> int:
    """Log `msg` as an error; the exit code of bad input."""
    get_logger(__name__).error(msg)
    return CONFIG_ERROR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mgt eval", description="Perplexity of a trained model on local text files "
                                 "through lm-evaluation-harness (task mgt_text), beside our own loss on the same "
                                 "windows.")
    ap.add_argument("source", help="run directory (latest good checkpoint), checkpoint directory or export directory")
    ap.add_argument("--text", nargs="+", required=True, help="UTF-8 text files, one document each")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--keep-export", default=None, help="write the transformers export here (kept) instead of a "
                    "temporary directory")
    args = ap.parse_args(argv)
    for f in args.text:
        try:
            Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return fail(f"--text {f}: cannot read it as UTF-8 text ({e})")
    try:
        import lm_eval  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return fail(f"{e.name} is not installed: install the `eval` extra (pip install 'mgt-scale[eval]')")
    from mgt_scale.data.tokenizer import Tokenizer
    from mgt_scale.hf.export_hf import HFExportError, write_hf
    from mgt_scale.hf.lm_eval_task import run_lm_eval
    from mgt_scale.hf.text_loss import stream_nll
    from mgt_scale.train.model_source import SourceError, open_model
    try:
        src = open_model(args.source)
    except SourceError as e:
        return fail(str(e))
    if src.tokenizer is None:
        return fail(f"{args.source}: no tokenizer.model (next to the weights or in data.path): mgt eval scores text")
    tok = Tokenizer(src.tokenizer)
    L = src.cfg.model.max_seq_len
    with tempfile.TemporaryDirectory(prefix="mgt-eval-") as tmp:
        out_dir = Path(args.keep_export or Path(tmp) / "hf")
        try:
            with contextlib.redirect_stdout(sys.stderr):
                write_hf(src.model, src.cfg.model, src.tokenizer, out_dir)
        except (HFExportError, OSError) as e:
            return fail(str(e))
        metrics = run_lm_eval(out_dir, [str(Path(f).resolve()) for f in args.text])
    nll = count = 0
    for f in args.text:
        a, b = stream_nll(src.model, tok.encode(Path(f).read_text(encoding="utf-8")), tok.eos_id, L)
        nll, count = nll + a, count + b
    ours = nll / max(count, 1)
    report = {"source": str(args.source), "texts": args.text, "tokens": count, "max_length": L,
              "lm_eval": metrics, "mgt_loss": ours, "mgt_perplexity": math.exp(ours)}
    print(f"lm-eval mgt_text: token_perplexity {metrics['token_perplexity']:.6g}, word_perplexity "
          f"{metrics['word_perplexity']:.6g}, byte_perplexity {metrics['byte_perplexity']:.6g}, bits_per_byte "
          f"{metrics['bits_per_byte']:.6g}")
    print(f"mgt (same {count} tokens, windows of {L}): loss {ours:.6f}, perplexity {math.exp(ours):.6g}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
