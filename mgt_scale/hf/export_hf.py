# `mgt export SOURCE --output DIR --format hf`: a directory that transformers loads with
# `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and `AutoTokenizer.from_pretrained(DIR)`
# with no mgt-scale installed:
#   config.json           MGTConfig (remote/configuration_mgt.py) with our whole `model:` section
#   configuration_mgt.py, modeling_mgt.py   remote/ (MGTForCausalLM: PreTrainedModel + GenerationMixin)
#   transformer.py, layers.py, residual.py, ...   mgt_scale/model/*.py copied, imports made relative
#   model.safetensors     our weights under `model.` (MGTForCausalLM.model is our MGTModel)
#   tokenizer.json, tokenizer_config.json   from our SentencePiece model (tokenizer_json.py); tokenizer.model
#   generation_config.json   eos_token_id
# One source of truth: the model code is mgt_scale/model itself, copied at export time, so the two cannot
# drift; `model_files()` refuses an mgt_scale import it cannot point into the export (a test exports every
# residual kind and compares logits).
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from mgt_scale.data.shards import TOKENIZER_FILE
from mgt_scale.logs import get_logger
from mgt_scale.train.export import WEIGHTS

HERE = Path(__file__).resolve().parent
REMOTE = HERE / "remote"
MODEL_SRC = HERE.parent / "model"
SKIP = {"__init__.py"}  # the package init (transformers writes its own)
CONFIG_NAMES = {"ModelConfig"}  # names of mgt_scale.config that remote/configuration_mgt.py provides

_FROM_MODEL = re.compile(r"^(\s*)from mgt_scale\.model\.(\w+) import (.+)$", re.M)
_FROM_PKG = re.compile(r"^(\s*)from mgt_scale\.model import (.+)$", re.M)
_FROM_CONFIG = re.compile(r"^(\s*)from mgt_scale\.config import (.+)$", re.M)


class HFExportError(RuntimeError):
    pass


def _names(text: str) -> list[str]:
    return [n.strip().split(" as ")[0].strip() for n in text.strip("() ").split(",") if n.strip()]


def rewrite_source(name: str, text: str) -> str:
    """One mgt_scale/model file with its mgt_scale imports pointed at the export's own files."""
    modules = {p.stem for p in MODEL_SRC.glob("*.py")}
    text = _FROM_MODEL.sub(lambda m: f"{m.group(1)}from .{m.group(2)} import {m.group(3)}", text)

    def pkg(m):  # `from mgt_scale.model import recompute`: a module of the package
        names = _names(m.group(2))
        if not all(n in modules for n in names):
            raise HFExportError(f"mgt_scale/model/{name}: `from mgt_scale.model import {m.group(2)}` imports a "
                                f"name, not a module: import it from its module for the Hugging Face export")
        # `from . import x` is not seen by transformers' loader, which copies the files named by
        # `from .x import ...` into its module cache: name each file that way too
        ind = m.group(1)
        return "\n".join([f"{ind}from . import {m.group(2)}"]
                         + [f"{ind}from .{n} import __name__ as _{n}_module  # noqa: F401 (for transformers' loader)"
                            for n in names])
    text = _FROM_PKG.sub(pkg, text)

    def config(m):
        missing = [n for n in _names(m.group(2)) if n not in CONFIG_NAMES]
        if missing:
            raise HFExportError(f"mgt_scale/model/{name} imports {missing} from mgt_scale.config; the Hugging Face "
                                f"export provides only {sorted(CONFIG_NAMES)} (mgt_scale/hf/remote/configuration_mgt.py)")
        return f"{m.group(1)}from .configuration_mgt import {m.group(2)}"
    text = _FROM_CONFIG.sub(config, text)
    left = [l.strip() for l in text.splitlines() if re.match(r"\s*(from|import)\s+mgt_scale\b", l)]
    if left:
        raise HFExportError(f"mgt_scale/model/{name}: cannot point {left[0]!r} into the Hugging Face export")
    return f"# Copied from mgt_scale/model/{name} by `mgt export --format hf` (imports made relative).\n" + text


def model_files() -> dict[str, str]:
    """{file name: text} of the export's Python files: remote/*.py and mgt_scale/model/*.py rewritten."""
    files = {p.name: p.read_text() for p in sorted(REMOTE.glob("*.py"))}
    for p in sorted(MODEL_SRC.glob("*.py")):
        if p.name not in SKIP:
            files[p.name] = rewrite_source(p.name, p.read_text())
    return files


def hf_config(model_cfg, dtype: str) -> dict:
    from mgt_scale.config import to_dict
    m = to_dict(model_cfg)
    return {
        "architectures": ["MGTForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_mgt.MGTConfig",
                     "AutoModelForCausalLM": "modeling_mgt.MGTForCausalLM"},
        "model_type": "mgt",
        "mgt_model": m,
        "tie_word_embeddings": bool(m["tie_embeddings"]),
        "use_cache": True,
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
    }


def write_hf(model: torch.nn.Module, model_cfg, tokenizer: Path | None, out: str | Path, dtype: str = "fp32",
             log=None) -> Path:
    """Write the Hugging Face directory for `model` (an MGTModel) built from `model_cfg` (ModelConfig).
    `log`: where the progress lines go (default: this module's logger at INFO)."""
    log = log or get_logger(__name__).info
    from safetensors.torch import save_file
    out = Path(out)
    files = model_files()  # first: a model source the export cannot carry fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # every tensor on its own (a tied head gets its own copy: safetensors refuses shared storage;
    # transformers ties it back from tie_word_embeddings)
    sd = {f"model.{k}": v.detach().to(target).contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
    cfg = hf_config(model_cfg, dtype)
    eos = None
    if tokenizer is not None:
        from mgt_scale.data.tokenizer import Tokenizer
        from mgt_scale.hf.tokenizer_json import write_tokenizer
        mtype = write_tokenizer(tokenizer, out, model_cfg.max_seq_len)
        shutil.copy2(tokenizer, out / TOKENIZER_FILE)
        eos = Tokenizer(tokenizer).eos_id
        cfg["eos_token_id"] = eos
        if mtype == "UNIGRAM":
            log("a Unigram tokenizer: transformers' tokenizer may break ties inside long runs of spaces "
                "differently from SentencePiece (BPE, mgt prep's default, encodes identically)")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"do_sample": False, **({"eos_token_id": eos} if eos is not None else {})}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    log(f"exported a Hugging Face model to {out} ({len(sd)} tensors, {dtype}, "
        f"{'tokenizer' if tokenizer is not None else 'no tokenizer'}); load it with "
        f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return out


def export_hf(source: str | Path, output: str | Path, dtype: str = "fp32", log=None) -> Path:
    """An export, checkpoint or run directory (mgt_scale.train.model_source) -> Hugging Face directory."""
    from mgt_scale.train.model_source import open_model
    src = open_model(source)
    return write_hf(src.model, src.cfg.model, src.tokenizer, output, dtype, log)
