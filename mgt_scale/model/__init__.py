# The MGT model family in pure torch (no DeepSpeed, no torch.distributed): see transformer.py for the
# stack and residual.py for the residual operators.
from mgt_scale.model.residual import ResidualOp, deepnorm_constants, mgt_beta, mgt_update
from mgt_scale.model.transformer import (Block, BlockStack, Head, KVCache, MGTModel, TokenEmbedding, build_model,
                                         count_parameters, init_units, lm_loss, module_generator, unit_params)

__all__ = ["ResidualOp", "deepnorm_constants", "mgt_beta", "mgt_update", "Block", "BlockStack", "Head", "KVCache", "MGTModel",
           "TokenEmbedding", "build_model", "count_parameters", "init_units", "lm_loss", "module_generator",
           "unit_params"]
