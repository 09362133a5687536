"""Training: data and tokenizers, the trainer, and held-out evaluation."""
from .trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
