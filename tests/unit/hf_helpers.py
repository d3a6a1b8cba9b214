# Helpers for the Hugging Face export tests: a small BPE tokenizer trained with mgt prep's settings on
# stdlib files, tiny models of every residual kind, and running a script in a Python that cannot
# import mgt_scale (isolated mode, a working directory outside the checkout, no PYTHONPATH).
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

STDLIB = Path(os.__file__).parent


def stdlib_texts(n: int, seed: int = 0) -> list[str]:
    import random
    files = sorted(glob.glob(str(STDLIB / "**" / "*.py"), recursive=True))
    random.Random(seed).shuffle(files)
    out = []
    for f in files:
        try:
            out.append(Path(f).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if len(out) == n:
            break
    return out


def train_small_tokenizer(path: Path, model_type: str = "bpe", vocab_size: int = 600):
    from mgt_scale.data.tokenizer import sample_sentences, train_tokenizer
    texts = stdlib_texts(40, seed=1)
    sents = sample_sentences(lambda i: texts[i], len(texts), 5000, 0)
    return train_tokenizer(sents, path, vocab_size=vocab_size, model_type=model_type, seed=0)


def tiny_model_config(residual: str, **over):
    from mgt_scale.config import MGTConfig, ModelConfig
    mgt = MGTConfig(**over.pop("mgt", {}))
    fields = dict(num_layers=2, d_model=32, num_heads=2, d_ff=64, vocab_size=608, max_seq_len=48)
    return ModelConfig(residual=residual, mgt=mgt, **{**fields, **over})


def run_isolated(script: str, *args: str, cwd: Path, timeout: int = 300) -> dict:
    """Run `script` with this interpreter in isolated mode (-I: no PYTHONPATH, no user site, no script
    directory on sys.path) from `cwd`, so `import mgt_scale` fails unless transformers' loader brings
    it in; returns the JSON the script prints after "RESULT " (transformers may print on stdout too)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_MODULES_CACHE=str(cwd / "hf_modules"))
    p = subprocess.run([sys.executable, "-I", "-c", script, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.rsplit("RESULT ", 1)[1])


def save_tensor(path: Path, t: torch.Tensor) -> None:
    path.write_text(json.dumps(t.tolist()))
