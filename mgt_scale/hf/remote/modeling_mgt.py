# modeling_mgt.py of a Hugging Face export (`mgt export --format hf`): `MGTForCausalLM`, a
# PreTrainedModel with GenerationMixin around mgt-scale's own MGTModel. The model code is not
# re-implemented here: transformer.py, layers.py, residual.py, ... in this directory are mgt_scale/model's
# files, copied by the exporter with their package imports made relative. Incremental decoding uses MGTModel's
# own cached forward (`forward(tokens, cache=...)`), with the keys and values kept in the transformers
# Cache that generate() passes as `past_key_values`.
# Shipped verbatim by mgt-scale (mgt_scale/hf/remote/); needs torch and transformers, not mgt-scale.
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mgt import MGTConfig
from .transformer import MGTModel


class _LayerCacheView:
    """One layer of a transformers Cache seen as mgt-scale's LayerKV (`length`, `append(k, v)`)."""

    def __init__(self, cache: Cache, layer_idx: int):
        self.cache, self.layer_idx = cache, layer_idx

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(self.layer_idx)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, self.layer_idx)


class _CacheView:
    """A transformers Cache seen as mgt-scale's KVCache (`layers`, `length`)."""

    def __init__(self, cache: Cache, num_layers: int):
        self.layers = [_LayerCacheView(cache, i) for i in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


class MGTPreTrainedModel(PreTrainedModel):
    config_class = MGTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        # mgt-scale's initialisation (MGTModel.init_weights) for a model built without weights; a
        # loaded model's weights all come from model.safetensors
        if isinstance(module, MGTModel):
            module.init_weights(seed=0)


class MGTForCausalLM(MGTPreTrainedModel, GenerationMixin):
    def __init__(self, config: MGTConfig):
        super().__init__(config)
        self.model = MGTModel(config.model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.head.proj.weight": "model.embed.tok.weight"}
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed.tok

    def set_input_embeddings(self, value):
        self.model.embed.tok = value

    def get_output_embeddings(self):
        return self.model.head.proj

    def set_output_embeddings(self, value):
        self.model.head.proj = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] for `input_ids`, which follow the positions already in `past_key_values`.
        Padding is not supported (the model has no attention mask): `attention_mask`, when given, must
        be all ones; rotary positions are the cache length onwards."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("MGTForCausalLM takes input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MGTForCausalLM does not support padding (an attention_mask with zeros): "
                             "pass sequences of equal length, or one at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = None
        if use_cache:
            if past_key_values is None:
                past_key_values = DynamicCache(config=self.config)
            cache = _CacheView(past_key_values, len(self.model.blocks))
        logits = self.model(input_ids, cache=cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
