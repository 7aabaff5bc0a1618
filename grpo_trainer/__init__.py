"""grpo_trainer: a thin GRPO / GRPO-λ trainer built on lambda_kernels' public API.

Command line: `grpo-lambda train` (no arguments: the embedded offline default) and `grpo-lambda evaluate`.
From Python: `train(GRPOLambdaConfig(...))`. With TRL installed, `grpo_trainer.trl_trainer.GRPOLambdaTRLTrainer` is
TRL's GRPOTrainer with the fused GRPO-λ loss (imported on its own: this package does not need TRL).
"""
from .config import ConfigError, GRPOLambdaConfig, build_config
from .rewards import REGISTRY as REWARD_FUNCS, RewardFunctionError


def train(cfg: GRPOLambdaConfig) -> dict:
    """Run a training job; returns held-out results {'before_rl': ..., 'after_rl': ...}."""
    from .trainer import train as _train

    return _train(cfg)


__all__ = ["GRPOLambdaConfig", "ConfigError", "RewardFunctionError", "REWARD_FUNCS", "build_config", "train"]
