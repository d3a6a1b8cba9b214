# Dataset and metrics of the `mgt_text` lm-eval task (mgt_text.yaml): local text files, one document
# each, with their token counts (the model's own tokenizer, from lm-eval's `pretrained`), so that the
# task reports perplexity per token besides lm-eval's usual per word and per byte.
from __future__ import annotations

import re
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "sample.txt"


def load(text_file=None, pretrained=None, **kwargs):
    """DatasetDict {"test": one row per file: text, num_tokens}. lm-eval passes its `--metadata` and the
    model arguments (`pretrained`) here."""
    import datasets
    from transformers import AutoTokenizer
    files = [SAMPLE] if not text_file else [text_file] if isinstance(text_file, str) else list(text_file)
    if pretrained is None:
        raise ValueError("mgt_text: no `pretrained` model directory to count tokens with (run with --model hf "
                         "--model_args pretrained=DIR,...)")
    tok = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=False)
    rows = []
    for f in files:
        text = Path(f).read_text(encoding="utf-8")
        rows.append({"text": text, "path": str(f), "num_tokens": len(tok.encode(text, add_special_tokens=False))})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    (loglikelihood,) = results
    text = doc["text"]
    words = len(re.split(r"\s+", text))
    nbytes = len(text.encode("utf-8"))
    return {
        "token_perplexity": (loglikelihood, doc["num_tokens"]),
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
