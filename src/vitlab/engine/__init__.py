"""Training (DeiT distillation, torchrun), evaluation and inference loops, checkpoints and run directories."""

from .checkpoint import load_weights, read_metadata, save_weights
from .config import DataConfig, DistillConfig, ModelConfig, OptimConfig, RunConfig, load_config
from .evaluate import EvalResult, evaluate_model
from .inference import Prediction, evaluate_run, load_trained, predict
from .train import train

__all__ = [
    "DataConfig",
    "DistillConfig",
    "EvalResult",
    "ModelConfig",
    "OptimConfig",
    "Prediction",
    "RunConfig",
    "evaluate_model",
    "evaluate_run",
    "load_config",
    "load_trained",
    "load_weights",
    "predict",
    "read_metadata",
    "save_weights",
    "train",
]
