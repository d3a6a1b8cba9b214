# The run configuration: the typed schema (schema.py: one frozen dataclass per concern, a declared range
# on every numeric field) and its strict loading (loading.py: YAML without duplicate keys, `--set`
# overrides, type, range and cross-field checks whose errors name the file or override and the dotted
# key; the resolved config saved with every run and checkpoint). Import from here.
from mgt_scale.config.loading import (CONFIG_FILE, RETIRED_KEYS, Sources, apply_override, check_ranges, config_hash, from_dict,
                                      load_config, parse_override, save_config, to_dict, validate)
from mgt_scale.config.schema import (INT64_MAX, MGT_FAMILY, RESIDUAL_KINDS, BlendSource, CheckpointConfig, Config,
                                     ConfigError, DataConfig, DDLDeltaConfig, LogConfig, MGTConfig, MHCConfig,
                                     ModelConfig, MonitorConfig, ParallelConfig, Range, RunConfig, TrainConfig, canonical_mode,
                                     num)

__all__ = ["CONFIG_FILE", "RETIRED_KEYS", "Sources", "apply_override", "check_ranges", "config_hash", "from_dict", "load_config",
           "parse_override", "save_config", "to_dict", "validate", "INT64_MAX", "MGT_FAMILY", "RESIDUAL_KINDS",
           "BlendSource", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DDLDeltaConfig", "LogConfig",
           "MGTConfig", "MHCConfig", "ModelConfig", "MonitorConfig", "ParallelConfig", "Range", "RunConfig",
           "TrainConfig", "canonical_mode", "num"]
