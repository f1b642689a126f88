"""The one typed config of a run: the schema sections (schema.py, model.py), the rules that span them
(validate.py, layout.py, features.py) and resolve(), which turns Hydra's composed DictConfig into a
validated JobConfig. Imports no torch, so a bad command line fails in a blink."""

from pretrain.config.model import MLAConfig, ModelConfig, MoEConfig
from pretrain.config.resolve import resolve
from pretrain.config.schema import (
    ActivationCheckpointConfig,
    CheckpointConfig,
    ClusterConfig,
    CommConfig,
    CompileConfig,
    DataConfig,
    Float8Config,
    JobConfig,
    JobSection,
    LRSchedulerConfig,
    MetricsConfig,
    OptimizerConfig,
    ParallelismConfig,
    ProfilingConfig,
    TrainingConfig,
    register_configs,
)
from pretrain.config.validate import validate, validate_cluster, validate_data
from pretrain.errors import ConfigError

__all__ = [
    "ActivationCheckpointConfig", "CheckpointConfig", "ClusterConfig", "CommConfig", "CompileConfig", "ConfigError",
    "DataConfig", "Float8Config", "JobConfig", "JobSection", "LRSchedulerConfig", "MLAConfig", "MetricsConfig",
    "ModelConfig", "MoEConfig", "OptimizerConfig", "ParallelismConfig", "ProfilingConfig", "TrainingConfig",
    "register_configs", "resolve", "validate", "validate_cluster", "validate_data",
]
