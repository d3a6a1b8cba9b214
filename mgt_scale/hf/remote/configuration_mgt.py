# configuration_mgt.py of a Hugging Face export (`mgt export --format hf`): the `transformers` config of
# an mgt-scale model. `mgt_model` holds mgt-scale's whole `model:` section (every residual kind, the MGT
# operator's parameters); the usual Hugging Face fields (hidden_size, num_hidden_layers, ...) are read
# from it. `ModelConfig` is the attribute view of `mgt_model` that the model code (copied unchanged from
# mgt_scale/model, its `from mgt_scale.config import ModelConfig` pointed here) is built from.
# Shipped verbatim by mgt-scale (mgt_scale/hf/remote/); needs transformers, not mgt-scale.
from __future__ import annotations

from types import SimpleNamespace

from transformers import PretrainedConfig


class ModelConfig(SimpleNamespace):
    """The fields of mgt_scale.config.ModelConfig as attributes (`cfg.d_model`, `cfg.mgt.lam`, ...)."""

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Every nested section (`mgt`, `mhc`, `ddl_delta`, ...) becomes an attribute view too."""
        fields = {k: SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in dict(data).items()}
        return cls(**fields)


class MGTConfig(PretrainedConfig):
    model_type = "mgt"

    def __init__(self, mgt_model: dict | None = None, **kwargs):
        self.mgt_model = dict(mgt_model or {})
        m = self.mgt_model
        self.vocab_size = m.get("vocab_size")
        self.hidden_size = m.get("d_model")
        self.num_hidden_layers = m.get("num_layers")
        self.num_attention_heads = m.get("num_heads")
        self.intermediate_size = m.get("d_ff")
        self.max_position_embeddings = m.get("max_seq_len")
        self.residual = m.get("residual")
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs.setdefault("tie_word_embeddings", bool(m.get("tie_embeddings", False)))
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.mgt_model)
